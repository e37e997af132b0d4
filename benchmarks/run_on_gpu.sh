#!/usr/bin/env bash
# On the GPU machine, after FA4 is staged (/tmp/fa4-env.sh sourced): install the package, then run the
# steps named in STEPS (default: all, in this order), results to $OUT:
#   tests      the GPU tests (TESTS narrows them, a pytest -k expression)
#   overhead   host overhead per call          first_step   the first training step
#   attention  the compiled attention block    padded       padded and packed batches vs FA4 varlen / Flex
#   hf_padded  left-padded HF Llama training vs stock and HF flash_attention_4, and padded BERT/RoBERTa
#   flex       FlexAttention programs vs Flex FLASH / Triton (FLEX_PROBLEMS narrows them)
#   hf_flex    HF Llama/Mistral/Gemma2 with attn_implementation="flex_attention" vs Flex Triton / FLASH
#              (HF_MODELS narrows them; HF_STATIC=1 compiles without dynamic=True, HF_TAG names the results)
#   block      the compiled qkv-projection block vs stock and FA4 called by hand
#   fuzz       the differential fuzz on the GPU (FUZZ_PROGRAMS programs, default 400, for at most FUZZ_MINUTES)
#   probe      FA4 varlen run in place over padded batches (left padding, documents) vs the plugin and packed varlen
#   gqa_probe  the left-padded HF Llama benchmark's attention alone: the plugin vs FA4 varlen, with and without GQA
#   vs_fa4     plain, GQA and window problems: the plugin vs FA4 direct and stock compile (results named by FA4 version;
#              VS_FA4_PROBLEMS narrows them)
#   host_profile where a step's host time goes, per variant (PROFILE_PROBLEM: a bench_vs_fa4 or bench_padded problem)
#   plan_check what checking a launch plan on its first replay costs
#   stock_probe stock torch.compile's SDPA gradients on transposed views vs float64
#   vit_mha    a ViT-B/16 train step with nn.MultiheadAttention: stock compile vs the plugin (results named by FA4)
#   position_bias MPT-style ALiBi, Falcon- and Bloom-style per-key ALiBi layers and T5 layers (learned table: forward;
#              frozen: fwd+bwd) vs stock, FA4 direct and Flex FLASH with the same score_mod (results named by FA4)
#   library_calls HF Llama/Mistral train steps with attn_implementation="flash_attention_4" compiled with the plugin
#              vs without it, the plugin on the sdpa model and stock; the packed documents problem through HF's packed
#              path vs FA4 varlen direct and the plugin's document-mask route (results named by FA4)
# BENCH_ARGS is passed to bench_attention.py (e.g. "--s 1024 --block-s 4096" for a short run).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repository root, for examples.* and tests.*
STEPS=${STEPS:-tests overhead first_step attention padded hf_padded}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
fa4_beta() {  # "b40" for flash-attn-4 4.0.0b40: result files are named by the FA4 they measured
  python3 -c "import importlib.metadata as m; print('b' + m.version('flash-attn-4').rsplit('b', 1)[-1])"
}
for step in $STEPS; do
  echo "== $step"
  case $step in
    tests) FA4_GPU_RESULTS=$OUT/gpu_results.jsonl timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -q tests/gpu ${TESTS:+-k "$TESTS"} 2>&1 | tee $OUT/gpu_tests.log | tail -15 ;;
    overhead) timeout 90 python3 benchmarks/bench_overhead.py --out $OUT 2>&1 | tail -16 ;;
    first_step) timeout 240 python3 benchmarks/bench_first_step.py --out $OUT 2>&1 | tail -10 ;;
    attention) timeout 300 python3 benchmarks/bench_attention.py --out $OUT/bench ${BENCH_ARGS:-} 2>&1 | grep -v "^{" | tail -25 ;;
    padded) timeout 300 python3 benchmarks/bench_padded.py --out $OUT 2>&1 | grep -v "^{" | tail -12 ;;
    hf_padded)
      timeout 300 python3 benchmarks/bench_hf_models.py --out $OUT --tag hf_llama_left_padded --models llama --seq 4096 \
        --left-pad 0.333 --modes train --variants stock plugin hf_fa4 2>&1 | grep -v "^{" | tail -8
      timeout 300 python3 benchmarks/bench_hf_models.py --out $OUT --tag hf_bert_roberta_padded --models bert roberta \
        --seq 2048 --left-pad 0.25 --modes train --variants stock plugin_no_sparsity plugin 2>&1 | grep -v "^{" | tail -8 ;;
    flex) timeout 580 python3 benchmarks/bench_flex.py --out $OUT ${FLEX_PROBLEMS:+--problems $FLEX_PROBLEMS} \
        ${FLEX_TAG:+--tag $FLEX_TAG} 2>&1 | grep -v "^{" | tail -16 ;;
    hf_flex) timeout 580 python3 benchmarks/bench_hf_models.py --out $OUT --tag ${HF_TAG:-hf_flex_attention_h200} \
        --models ${HF_MODELS:-llama mistral gemma2} --seq 4096 --modes train --attn flex_attention \
        --variants stock plugin flex_flash ${HF_STATIC:+--static} 2>&1 | tee $OUT/hf_flex.log | grep -v "^{" | tail -12 ;;
    block) timeout 300 python3 benchmarks/bench_attention.py --out $OUT/bench --d 128 --s 4096 --block-s 4096 16384 \
        2>&1 | grep -v "^{" | tail -12 ;;
    fuzz) timeout 580 python3 benchmarks/fuzz_gpu.py --programs ${FUZZ_PROGRAMS:-400} --minutes ${FUZZ_MINUTES:-9} --out $OUT 2>&1 | tail -12 ;;
    probe) timeout 300 python3 benchmarks/probe_zero_copy_varlen.py --out $OUT 2>&1 | grep -v -i warn | tail -8 ;;
    gqa_probe) timeout 300 python3 benchmarks/probe_gqa_masked.py --out $OUT 2>&1 | grep -v -i warn | tail -4 ;;
    vs_fa4) timeout 400 python3 benchmarks/bench_vs_fa4.py --out $OUT --tag vs_fa4_h200_$(fa4_beta) \
        ${VS_FA4_PROBLEMS:+--problems $VS_FA4_PROBLEMS} 2>&1 | grep -v "^{" | tail -14 ;;
    host_profile) for variant in ${PROFILE_VARIANTS:-plugin fa4_direct stock}; do
        timeout 200 python3 benchmarks/profile_padded_host.py --problem ${PROFILE_PROBLEM:-causal_s1k_b16} \
          --variant $variant --out $OUT/$(fa4_beta) 2>&1 | head -${PROFILE_LINES:-14}
      done ;;
    plan_check) timeout 200 python3 benchmarks/probe_plan_check.py --out $OUT --tag plan_check_h200_$(fa4_beta) 2>&1 \
        | tail -12 ;;
    stock_probe) timeout 300 python3 benchmarks/probe_stock_transposed.py --out $OUT 2>&1 | grep -v "^{" | tail -14 ;;
    vit_mha) timeout 400 python3 benchmarks/bench_vit_mha.py --out $OUT --tag vit_mha_train_h200_$(fa4_beta) 2>&1 \
        | grep -v "^{" | tail -10 ;;
    position_bias) timeout 400 python3 benchmarks/bench_position_bias.py --out $OUT --tag position_bias_$(fa4_beta) 2>&1 \
        | grep -v "^{" | tail -10 ;;
    library_calls)
      timeout 400 python3 benchmarks/bench_hf_models.py --out $OUT --tag hf_fa4_library_calls_$(fa4_beta) \
        --models llama mistral --seq 4096 --modes train --variants stock plugin hf_fa4 hf_fa4_plugin 2>&1 \
        | grep -v "^{" | tail -8
      timeout 180 python3 benchmarks/bench_padded.py --out $OUT --problems documents --tag hf_packed_$(fa4_beta) 2>&1 | grep -v "^{" | tail -8 ;;
    *) echo "unknown step $step" ;;
  esac
done
