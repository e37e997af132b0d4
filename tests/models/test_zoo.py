"""The model zoo (``tests/models/zoo.py``) compiled with the plugin on CPU, in training mode with dropout at 0.

For each architecture and attention implementation (sdpa, eager), on a padded batch and (the first implementation)
an unpadded one: every site's decision is the one the zoo expects (an architecture that ran FA4 and stops doing so
fails here), and the outputs and parameter gradients of the bf16 model, under a fixed random cotangent, are as close
to the float32 model's as bf16 eager's. Outputs at padded positions are not judged.

Dynamo traces each model with the plugin enabled and the plugin's graph rewrite (the pass Inductor runs before
lowering) is applied to each graph, which then runs eagerly on the ops' CPU reference: the decisions and numbers
are the compiled model's without Inductor's code generation, which costs ten times more here (the models are
compiled by Inductor in ``test_hf_models.py`` and ``test_seq2seq_models.py``).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fa4_inductor  # noqa: E402
from tests.compare import assert_as_exact_as_stock, rewriting_backend  # noqa: E402
from tests.models import zoo  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_compile_cache")



def _cases():
    """Each implementation on a padded batch where the model takes a mask, and the first on an unpadded one too."""
    for architecture in zoo.ZOO:
        for rank, impl in enumerate(architecture.implementations):
            for padded in (True, False) if architecture.padded else (False,):
                if padded or rank == 0 or not architecture.padded:
                    yield pytest.param(architecture, impl, padded,
                                       id=f"{architecture.model_type}-{impl}-{'padded' if padded else 'full'}")


CASES = list(_cases())


def _kept(tensor: torch.Tensor, inputs: dict) -> torch.Tensor:
    """1 where ``tensor`` (an output) holds a position the batch does not pad, else 0; 1 for outputs that are not
    per position."""
    keep = torch.ones(())
    for name in ("attention_mask", "decoder_attention_mask"):
        mask = inputs.get(name)
        if mask is not None and tensor.dim() >= 2 and tensor.shape[:2] == mask.shape:
            keep = mask.reshape(*mask.shape, *[1] * (tensor.dim() - 2))
    return keep


def _outputs_and_grads(model, call, inputs: dict):
    """The model's floating outputs (padded positions zeroed, flattened into one vector) and the gradients of its
    parameters under a fixed random cotangent."""
    model.zero_grad(set_to_none=True)
    outputs = [t for t in call(**inputs).to_tuple() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    kept = [t.float() * _kept(t, inputs) for t in outputs]
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in kept)
    loss.backward()
    # Not a scalar parameter's (CLIP's logit scale): one sum over the batch, whose bf16 noise moves from 0.2 % to
    # 3 % with the seed; what feeds it is judged in the other gradients.
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None and p.numel() > 1}
    return torch.cat([t.detach().flatten() for t in kept]), grads


@pytest.mark.parametrize("architecture, impl, padded", CASES)
def test_zoo_sites_and_numbers(architecture: zoo.Architecture, impl: str, padded: bool):
    torch.manual_seed(0)
    try:
        model_fp32 = zoo.build(architecture, impl)
    except ValueError as exc:
        if "does not support an attention implementation" in str(exc):
            pytest.skip(f"transformers {transformers.__version__} has no {impl} {architecture.model_type}")
        raise
    model = copy.deepcopy(model_fp32).to(torch.bfloat16)
    exact = _outputs_and_grads(model_fp32, model_fp32, zoo.inputs(architecture, padded, torch.float32))
    inputs = zoo.inputs(architecture, padded, torch.bfloat16)
    eager = _outputs_and_grads(model, model, inputs)
    records: list = []
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = _outputs_and_grads(model, torch.compile(model, backend=rewriting_backend(records)), inputs)
    assert [zoo.reason_class(r) for r in records] == list(architecture.expected(impl)), \
        [(r.node, r.decision, r.reason) for r in records]
    assert got[1].keys() == eager[1].keys()
    # One layer of a tiny model: a bias or norm gradient, a sum over every position, carries 3-6 % bf16 noise that
    # moves with the seed; a wrong attention moves it by far more. The rest of the graph runs eagerly: eager's
    # rounding is the stock one.
    assert_as_exact_as_stock(got, eager, lambda: eager, exact, factor=1.5, margin=2e-2)
