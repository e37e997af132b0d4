// The fa4::flash_attn_fwd_kernel CUDA kernel in C++: a call whose exact signature has a learned launch
// plan allocates out and lse and calls FA4's compiled kernel (a TVM-FFI function) directly, with no
// Python on the way; any other call goes to the Python implementation (fa4::_flash_attn_fwd_python),
// which learns plans and registers them here (fa4_native::add_plan). See fa4_inductor/native.py.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>
#include <tvm/ffi/c_api.h>
#include <tvm/ffi/extra/c_env_api.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

// q, k, v sizes then strides: what the Python side's call_signature holds, in this order.
constexpr int kGeometry = 24;
constexpr int kMaxArgs = 64;
// Tensor slots of a plan index these: the call's tensors in the order the Python side numbers them.
enum Slot { kQ, kK, kV, kOut, kLse, kSequsedK, kSlots };
// How add_plan describes a constant argument.
enum ArgKind { kNone, kBool, kInt, kFloat, kObject, kTensorSlot };

struct CallKey {
  std::array<int64_t, kGeometry> geometry;
  double softmax_scale, softcap;
  int64_t window_left, window_right;
  int32_t dtype, device;
  bool causal, has_seqused_k;

  bool operator==(const CallKey& o) const {
    return geometry == o.geometry && softmax_scale == o.softmax_scale && softcap == o.softcap &&
           window_left == o.window_left && window_right == o.window_right && dtype == o.dtype &&
           device == o.device && causal == o.causal && has_seqused_k == o.has_seqused_k;
  }
};

struct CallKeyHash {
  size_t operator()(const CallKey& key) const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t x) { h = (h ^ x) * 1099511628211ull; };
    for (int64_t g : key.geometry) mix(static_cast<uint64_t>(g));
    uint64_t bits;
    std::memcpy(&bits, &key.softmax_scale, sizeof bits);
    mix(bits);
    mix(static_cast<uint64_t>(key.window_left) ^ (static_cast<uint64_t>(key.window_right) << 20));
    mix(static_cast<uint64_t>(key.dtype) | (static_cast<uint64_t>(key.device) << 8) |
        (static_cast<uint64_t>(key.causal) << 16) | (static_cast<uint64_t>(key.has_seqused_k) << 17));
    return static_cast<size_t>(h);
  }
};

struct Plan {
  void* function;  // a TVM-FFI function object, kept alive by the Python side
  std::vector<TVMFFIAny> args;
  std::vector<std::pair<int, int>> slots;  // (argument position, Slot)
};

std::mutex plans_lock;
std::unordered_map<CallKey, std::shared_ptr<const Plan>, CallKeyHash> plans;

CallKey make_key(const std::array<int64_t, kGeometry>& geometry, at::ScalarType dtype, int64_t device,
                 double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
                 bool has_seqused_k) {
  return CallKey{geometry, softmax_scale, softcap, window_left, window_right, static_cast<int32_t>(dtype),
                 static_cast<int32_t>(device), causal, has_seqused_k};
}

CallKey key_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double softmax_scale,
               bool causal, int64_t window_left, int64_t window_right, double softcap,
               bool has_seqused_k) {
  std::array<int64_t, kGeometry> geometry;
  int i = 0;
  for (const at::Tensor* t : {&q, &k, &v})
    for (int64_t s : t->sizes()) geometry[i++] = s;
  for (const at::Tensor* t : {&q, &k, &v})
    for (int64_t s : t->strides()) geometry[i++] = s;
  return make_key(geometry, q.scalar_type(), q.device().index(), softmax_scale, causal, window_left,
                  window_right, softcap, has_seqused_k);
}

std::shared_ptr<const Plan> find_plan(const CallKey& key) {
  std::lock_guard<std::mutex> guard(plans_lock);
  auto found = plans.find(key);
  return found == plans.end() ? nullptr : found->second;
}

DLDataType dl_dtype(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16: return {kDLBfloat, 16, 1};
    case at::kHalf: return {kDLFloat, 16, 1};
    case at::kFloat: return {kDLFloat, 32, 1};
    case at::kInt: return {kDLInt, 32, 1};
    default: TORCH_CHECK(false, "fa4_native: no DLPack dtype for ", type);
  }
}

// A view of the tensor for the call's duration; shape and strides point into the tensor.
DLTensor dl_tensor(const at::Tensor& t) {
  DLTensor dl;
  dl.data = t.data_ptr();
  dl.device = {t.is_cuda() ? kDLCUDA : kDLCPU, t.is_cuda() ? t.device().index() : 0};
  dl.ndim = static_cast<int32_t>(t.dim());
  dl.dtype = dl_dtype(t.scalar_type());
  dl.shape = const_cast<int64_t*>(t.sizes().data());
  dl.strides = const_cast<int64_t*>(t.strides().data());
  dl.byte_offset = 0;
  return dl;
}

[[noreturn]] void raise_ffi_error() {
  TVMFFIObjectHandle error = nullptr;
  TVMFFIErrorMoveFromRaised(&error);
  std::string message = "FA4 kernel call failed";
  if (error != nullptr) {
    const TVMFFIErrorCell* cell = TVMFFIErrorGetCellPtr(error);
    message += ": " + std::string(cell->kind.data, cell->kind.size) + ": " +
               std::string(cell->message.data, cell->message.size);
    TVMFFIObjectDecRef(error);
  }
  TORCH_CHECK(false, message);
}

// Calls the plan's function on the tensors, with the tensors' CUDA stream as TVM-FFI's env stream
// (FA4's kernels launch on TVMFFIEnvGetStream).
void call_plan(const Plan& plan, const std::array<const at::Tensor*, kSlots>& tensors) {
  std::array<DLTensor, kSlots> views;
  std::array<TVMFFIAny, kMaxArgs> args;
  const size_t count = plan.args.size();
  std::memcpy(args.data(), plan.args.data(), count * sizeof(TVMFFIAny));
  for (const auto& [position, slot] : plan.slots) {
    views[slot] = dl_tensor(*tensors[slot]);
    args[position].type_index = kTVMFFIDLTensorPtr;
    args[position].v_ptr = &views[slot];
  }
  const at::Tensor& q = *tensors[kQ];
  TVMFFIStreamHandle stream = nullptr, previous = nullptr;
  const int32_t device = q.device().index();
  if (q.is_cuda()) {
    stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q.device()).native_handle();
    TORCH_CHECK(TVMFFIEnvSetStream(kDLCUDA, device, stream, &previous) == 0, "fa4_native: TVMFFIEnvSetStream failed");
  }
  TVMFFIAny result;
  std::memset(&result, 0, sizeof result);
  result.type_index = kTVMFFINone;
  const int status = TVMFFIFunctionCall(plan.function, args.data(), static_cast<int32_t>(count), &result);
  if (q.is_cuda() && previous != stream) TVMFFIEnvSetStream(kDLCUDA, device, previous, nullptr);
  if (status != 0) raise_ffi_error();
  if (result.type_index >= kTVMFFIStaticObjectBegin) TVMFFIObjectDecRef(result.v_obj);
}

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, int64_t, int64_t, double,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           double softmax_scale, bool causal, int64_t window_left,
                                           int64_t window_right, double softcap,
                                           const std::optional<at::Tensor>& seqused_k,
                                           const std::optional<at::Tensor>& key_padding,
                                           const std::optional<at::Tensor>& segment_ids) {
  // Masks read from tensors (block sparsity computed per call) always take the Python kernel.
  if (!key_padding.has_value() && !segment_ids.has_value() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4) {
    auto plan = find_plan(key_of(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                                 seqused_k.has_value()));
    if (plan) {
      const c10::DeviceGuard device_guard(q.device());
      const int64_t batch = q.size(0), seqlen_q = q.size(1), heads = q.size(2);
      at::Tensor out = at::empty({batch, seqlen_q, heads, v.size(3)}, q.options());
      at::Tensor lse = at::empty({batch, heads, seqlen_q}, q.options().dtype(at::kFloat));
      call_plan(*plan, {&q, &k, &v, &out, &lse, seqused_k.has_value() ? &*seqused_k : nullptr});
      return {out, lse};
    }
  }
  static const auto python_forward = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow("fa4::_flash_attn_fwd_python", "")
                                         .typed<ForwardSignature>();
  return python_forward.call(q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                             key_padding, segment_ids);
}

TVMFFIAny constant_arg(int64_t kind, int64_t value, double real) {
  TVMFFIAny arg;
  std::memset(&arg, 0, sizeof arg);
  switch (kind) {
    case kNone: arg.type_index = kTVMFFINone; break;
    case kBool: arg.type_index = kTVMFFIBool; arg.v_int64 = value; break;
    case kInt: arg.type_index = kTVMFFIInt; arg.v_int64 = value; break;
    case kFloat: arg.type_index = kTVMFFIFloat; arg.v_float64 = real; break;
    case kObject:
      arg.v_obj = reinterpret_cast<TVMFFIObject*>(value);
      arg.type_index = arg.v_obj->type_index;
      break;
    default: TORCH_CHECK(false, "fa4_native: unknown argument kind ", kind);
  }
  return arg;
}

void add_plan(at::IntArrayRef geometry, at::ScalarType dtype, int64_t device, double softmax_scale, bool causal,
              int64_t window_left, int64_t window_right, double softcap, bool has_seqused_k, int64_t function,
              at::IntArrayRef kinds, at::IntArrayRef values, at::ArrayRef<double> reals) {
  TORCH_CHECK(geometry.size() == kGeometry, "fa4_native: geometry needs ", kGeometry, " sizes and strides");
  TORCH_CHECK(kinds.size() == values.size() && kinds.size() == reals.size() && kinds.size() <= kMaxArgs,
              "fa4_native: inconsistent plan arguments");
  std::array<int64_t, kGeometry> sizes_and_strides;
  std::copy(geometry.begin(), geometry.end(), sizes_and_strides.begin());
  const CallKey key = make_key(sizes_and_strides, dtype, device, softmax_scale, causal, window_left, window_right,
                               softcap, has_seqused_k);
  auto plan = std::make_shared<Plan>();
  plan->function = reinterpret_cast<void*>(function);
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (kinds[i] == kTensorSlot) {
      TORCH_CHECK(values[i] >= 0 && values[i] < kSlots && (values[i] != kSequsedK || has_seqused_k),
                  "fa4_native: bad tensor slot ", values[i]);
      plan->slots.emplace_back(static_cast<int>(i), static_cast<int>(values[i]));
      plan->args.push_back(constant_arg(kNone, 0, 0.0));
    } else {
      plan->args.push_back(constant_arg(kinds[i], values[i], reals[i]));
    }
  }
  std::lock_guard<std::mutex> guard(plans_lock);
  plans[key] = std::move(plan);
}

void clear_plans() {
  std::lock_guard<std::mutex> guard(plans_lock);
  plans.clear();
}

int64_t plan_count() {
  std::lock_guard<std::mutex> guard(plans_lock);
  return static_cast<int64_t>(plans.size());
}

// Made by install_cuda_forward: the C++ kernel replaces nothing, it is registered only where the
// Python side did not register its own.
std::unique_ptr<torch::Library> cuda_registration;

void install_cuda_forward() {
  if (cuda_registration) return;
  cuda_registration = std::make_unique<torch::Library>(torch::Library::IMPL, "fa4", c10::DispatchKey::CUDA,
                                                        __FILE__, __LINE__);
  cuda_registration->impl("flash_attn_fwd_kernel", TORCH_FN(forward));
}

}  // namespace

TORCH_LIBRARY(fa4_native, m) {
  m.def("add_plan(int[] geometry, ScalarType dtype, int device, float softmax_scale, bool causal, "
        "int window_left, int window_right, float softcap, bool has_seqused_k, int function, int[] kinds, "
        "int[] values, float[] reals) -> ()",
        add_plan);
  m.def("clear_plans() -> ()", clear_plans);
  m.def("plan_count() -> int", plan_count);
  m.def("install_cuda_forward() -> ()", install_cuda_forward);
  // The kernel on any device, for tests (CPU tensors take the same path with no stream).
  m.def("forward(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal=False, int window_left=-1, "
        "int window_right=-1, float softcap=0.0, Tensor? seqused_k=None, Tensor? key_padding=None, "
        "Tensor? segment_ids=None) "
        "-> (Tensor, Tensor)",
        forward);
}
