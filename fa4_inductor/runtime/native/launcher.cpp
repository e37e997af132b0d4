// The CUDA kernels of fa4::flash_attn_fwd_kernel and fa4::flash_attn_bwd in C++: a call whose exact
// signature has a learned, trusted launch plan allocates its outputs (and a backward's scratch) and calls
// FA4's compiled kernels (TVM-FFI functions) directly, with no Python on the way; any other call goes to
// the Python implementation (fa4::_flash_attn_fwd_python, fa4::_flash_attn_bwd_python), which learns
// plans and registers them here (fa4_native::add_plan, add_backward_plan). See fa4_inductor/native.py.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
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

// A call's exact identity: its tensors' sizes and strides (kGeometry of them for a forward, kBackwardGeometry for
// a backward), dtype, device and options; flag is has_seqused_k for a forward, deterministic for a backward.
template <size_t N>
struct Key {
  std::array<int64_t, N> geometry;
  double softmax_scale, softcap;
  int64_t window_left, window_right;
  int32_t dtype, device;
  bool causal, flag;

  bool operator==(const Key& o) const {
    return geometry == o.geometry && softmax_scale == o.softmax_scale && softcap == o.softcap &&
           window_left == o.window_left && window_right == o.window_right && dtype == o.dtype &&
           device == o.device && causal == o.causal && flag == o.flag;
  }
};

template <size_t N>
struct KeyHash {
  size_t operator()(const Key<N>& key) const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t x) { h = (h ^ x) * 1099511628211ull; };
    for (int64_t g : key.geometry) mix(static_cast<uint64_t>(g));
    uint64_t bits;
    std::memcpy(&bits, &key.softmax_scale, sizeof bits);
    mix(bits);
    mix(static_cast<uint64_t>(key.window_left) ^ (static_cast<uint64_t>(key.window_right) << 20));
    mix(static_cast<uint64_t>(key.dtype) | (static_cast<uint64_t>(key.device) << 8) |
        (static_cast<uint64_t>(key.causal) << 16) | (static_cast<uint64_t>(key.flag) << 17));
    return static_cast<size_t>(h);
  }
};

using CallKey = Key<kGeometry>;

struct Plan {
  void* function;  // a TVM-FFI function object, kept alive by the Python side
  std::vector<TVMFFIAny> args;
  std::vector<std::pair<int, int>> slots;  // (argument position, Slot)
};

std::mutex plans_lock;
std::unordered_map<CallKey, std::shared_ptr<const Plan>, KeyHash<kGeometry>> plans;

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
    case at::kLong: return {kDLInt, 64, 1};
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

// TVM-FFI's env stream set to the tensor's CUDA stream for a scope (FA4's kernels launch on
// TVMFFIEnvGetStream); CPU tensors (tests) leave it alone.
class EnvStream {
 public:
  explicit EnvStream(const at::Tensor& t) : device_(t.is_cuda() ? t.device().index() : -1) {
    if (device_ < 0) return;
    stream_ = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
    TORCH_CHECK(TVMFFIEnvSetStream(kDLCUDA, device_, stream_, &previous_) == 0, "fa4_native: TVMFFIEnvSetStream failed");
  }
  ~EnvStream() {
    if (device_ >= 0 && previous_ != stream_) TVMFFIEnvSetStream(kDLCUDA, device_, previous_, nullptr);
  }
  EnvStream(const EnvStream&) = delete;
  EnvStream& operator=(const EnvStream&) = delete;

 private:
  int32_t device_;
  TVMFFIStreamHandle stream_ = nullptr, previous_ = nullptr;
};

// Calls the plan's function with tensors[slot] in each slot's argument position.
void call_plan(const Plan& plan, const at::Tensor* const* tensors, size_t tensor_count) {
  std::vector<DLTensor> views(plan.slots.size());
  std::array<TVMFFIAny, kMaxArgs> args;
  const size_t count = plan.args.size();
  std::memcpy(args.data(), plan.args.data(), count * sizeof(TVMFFIAny));
  for (size_t i = 0; i < plan.slots.size(); ++i) {
    const auto& [position, slot] = plan.slots[i];
    TORCH_CHECK(static_cast<size_t>(slot) < tensor_count && tensors[slot] != nullptr, "fa4_native: empty slot ", slot);
    views[i] = dl_tensor(*tensors[slot]);
    args[position].type_index = kTVMFFIDLTensorPtr;
    args[position].v_ptr = &views[i];
  }
  TVMFFIAny result;
  std::memset(&result, 0, sizeof result);
  result.type_index = kTVMFFINone;
  const int status = TVMFFIFunctionCall(plan.function, args.data(), static_cast<int32_t>(count), &result);
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
      const std::array<const at::Tensor*, kSlots> tensors{&q, &k, &v, &out, &lse,
                                                          seqused_k.has_value() ? &*seqused_k : nullptr};
      const EnvStream stream(q);
      call_plan(*plan, tensors.data(), tensors.size());
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

// A plan of a function from add_plan's argument description; tensor slots must be below slot_limit.
Plan make_plan(int64_t function, at::IntArrayRef kinds, at::IntArrayRef values, at::ArrayRef<double> reals,
               int64_t slot_limit) {
  TORCH_CHECK(kinds.size() == values.size() && kinds.size() == reals.size() && kinds.size() <= kMaxArgs,
              "fa4_native: inconsistent plan arguments");
  Plan plan;
  plan.function = reinterpret_cast<void*>(function);
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (kinds[i] == kTensorSlot) {
      TORCH_CHECK(values[i] >= 0 && values[i] < slot_limit, "fa4_native: bad tensor slot ", values[i]);
      plan.slots.emplace_back(static_cast<int>(i), static_cast<int>(values[i]));
      plan.args.push_back(constant_arg(kNone, 0, 0.0));
    } else {
      plan.args.push_back(constant_arg(kinds[i], values[i], reals[i]));
    }
  }
  return plan;
}

void add_plan(at::IntArrayRef geometry, at::ScalarType dtype, int64_t device, double softmax_scale, bool causal,
              int64_t window_left, int64_t window_right, double softcap, bool has_seqused_k, int64_t function,
              at::IntArrayRef kinds, at::IntArrayRef values, at::ArrayRef<double> reals) {
  TORCH_CHECK(geometry.size() == kGeometry, "fa4_native: geometry needs ", kGeometry, " sizes and strides");
  std::array<int64_t, kGeometry> sizes_and_strides;
  std::copy(geometry.begin(), geometry.end(), sizes_and_strides.begin());
  const CallKey key = make_key(sizes_and_strides, dtype, device, softmax_scale, causal, window_left, window_right,
                               softcap, has_seqused_k);
  auto plan = std::make_shared<Plan>(make_plan(function, kinds, values, reals, has_seqused_k ? kSlots : kSequsedK));
  std::lock_guard<std::mutex> guard(plans_lock);
  plans[key] = std::move(plan);
}

// ---- Backward: FA4's launch sequence (preprocess, main, postprocess kernels) with its scratch buffers.

// dout, q, k, v, out sizes then strides (4-D each), then lse's (3-D): what the Python side mirrors.
constexpr int kBackwardGeometry = 5 * 8 + 6;
// The call's tensors as a backward sequence's slots number them; its scratch buffers follow.
enum BackwardSlot { kDout, kBackwardQ, kBackwardK, kBackwardV, kBackwardOut, kBackwardLse, kDq, kDk, kDv,
                    kBackwardTensors };

using BackwardKey = Key<kBackwardGeometry>;

struct Scratch {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool zeroed;
};

struct BackwardPlan {
  std::vector<Plan> launches;
  std::vector<Scratch> scratch;
};

std::unordered_map<BackwardKey, std::shared_ptr<const BackwardPlan>, KeyHash<kBackwardGeometry>> backward_plans;

BackwardKey backward_key_of(const std::array<const at::Tensor*, 6>& tensors, double softmax_scale, bool causal,
                            int64_t window_left, int64_t window_right, double softcap, bool deterministic) {
  BackwardKey key{{}, softmax_scale, softcap, window_left, window_right,
                  static_cast<int32_t>(tensors[kBackwardQ]->scalar_type()),
                  static_cast<int32_t>(tensors[kBackwardQ]->device().index()), causal, deterministic};
  int i = 0;
  for (const at::Tensor* t : tensors) {
    for (int64_t s : t->sizes()) key.geometry[i++] = s;
    for (int64_t s : t->strides()) key.geometry[i++] = s;
  }
  return key;
}

// Calls a mirrored plan can serve: no masks read from tensors, the geometry and dtypes mirrored plans have.
bool backward_plannable(const std::array<const at::Tensor*, 6>& tensors, bool masked) {
  if (masked) return false;
  const at::ScalarType dtype = tensors[kBackwardQ]->scalar_type();
  for (int i = 0; i < 6; ++i) {
    const at::Tensor& t = *tensors[i];
    if (t.dim() != (i == kBackwardLse ? 3 : 4) || t.device() != tensors[kBackwardQ]->device() ||
        t.scalar_type() != (i == kBackwardLse ? at::kFloat : dtype))
      return false;
  }
  return true;
}

using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, bool, int64_t, int64_t, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& seqused_k, const std::optional<at::Tensor>& key_padding,
    const std::optional<at::Tensor>& segment_ids, const std::optional<at::Tensor>& masking_buffer) {
  const std::array<const at::Tensor*, 6> inputs{&dout, &q, &k, &v, &out, &lse};
  const bool masked = seqused_k.has_value() || key_padding.has_value() || segment_ids.has_value() ||
                      masking_buffer.has_value();
  if (backward_plannable(inputs, masked)) {
    std::shared_ptr<const BackwardPlan> plan;
    {
      const BackwardKey key = backward_key_of(inputs, softmax_scale, causal, window_left, window_right, softcap,
                                              at::globalContext().deterministicAlgorithms());
      std::lock_guard<std::mutex> guard(plans_lock);
      auto found = backward_plans.find(key);
      if (found != backward_plans.end()) plan = found->second;
    }
    if (plan) {
      const c10::DeviceGuard device_guard(q.device());
      // The layouts the Python kernel gives (fa4_adapter.gradient_like), which the mirrored plan was learned on.
      at::Tensor dq = at::empty_like(q, at::MemoryFormat::Preserve);
      at::Tensor dk = at::empty_like(k, at::MemoryFormat::Preserve);
      at::Tensor dv = at::empty_like(v, at::MemoryFormat::Preserve);
      std::vector<at::Tensor> scratch;
      scratch.reserve(plan->scratch.size());
      for (const Scratch& recipe : plan->scratch) {
        at::Tensor buffer = at::empty_strided(recipe.sizes, recipe.strides, q.options().dtype(recipe.dtype));
        scratch.push_back(recipe.zeroed ? buffer.zero_() : buffer);
      }
      std::vector<const at::Tensor*> tensors{&dout, &q, &k, &v, &out, &lse, &dq, &dk, &dv};
      for (const at::Tensor& buffer : scratch) tensors.push_back(&buffer);
      const EnvStream stream(q);
      for (const Plan& launch : plan->launches) call_plan(launch, tensors.data(), tensors.size());
      return {dq, dk, dv};
    }
  }
  static const auto python_backward = c10::Dispatcher::singleton()
                                          .findSchemaOrThrow("fa4::_flash_attn_bwd_python", "")
                                          .typed<BackwardSignature>();
  return python_backward.call(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap,
                              seqused_k, key_padding, segment_ids, masking_buffer);
}

// A backward launch sequence for calls with this exact signature. Launch i's arguments are the next
// arg_counts[i] entries of kinds/values/reals; scratch buffers take the geometry and dtype of the (meta)
// tensors in scratch, zero-filled where zeroed is nonzero, and slots from kBackwardTensors on.
void add_backward_plan(at::IntArrayRef geometry, at::ScalarType dtype, int64_t device, double softmax_scale,
                       bool causal, int64_t window_left, int64_t window_right, double softcap, bool deterministic,
                       at::IntArrayRef functions, at::IntArrayRef arg_counts, at::IntArrayRef kinds,
                       at::IntArrayRef values, at::ArrayRef<double> reals, at::TensorList scratch,
                       at::IntArrayRef zeroed) {
  TORCH_CHECK(geometry.size() == kBackwardGeometry, "fa4_native: backward geometry needs ", kBackwardGeometry,
              " sizes and strides");
  TORCH_CHECK(functions.size() == arg_counts.size() && scratch.size() == zeroed.size(),
              "fa4_native: inconsistent backward plan");
  BackwardKey key{{}, softmax_scale, softcap, window_left, window_right, static_cast<int32_t>(dtype),
                  static_cast<int32_t>(device), causal, deterministic};
  std::copy(geometry.begin(), geometry.end(), key.geometry.begin());
  auto plan = std::make_shared<BackwardPlan>();
  const int64_t slot_limit = kBackwardTensors + static_cast<int64_t>(scratch.size());
  size_t offset = 0;
  for (size_t i = 0; i < functions.size(); ++i) {
    const size_t count = static_cast<size_t>(arg_counts[i]);
    TORCH_CHECK(offset + count <= kinds.size(), "fa4_native: backward plan arguments run short");
    plan->launches.push_back(make_plan(functions[i], kinds.slice(offset, count), values.slice(offset, count),
                                       reals.slice(offset, count), slot_limit));
    offset += count;
  }
  TORCH_CHECK(offset == kinds.size(), "fa4_native: backward plan has arguments left over");
  for (size_t i = 0; i < scratch.size(); ++i)
    plan->scratch.push_back({scratch[i].sizes().vec(), scratch[i].strides().vec(), scratch[i].scalar_type(),
                             zeroed[i] != 0});
  std::lock_guard<std::mutex> guard(plans_lock);
  backward_plans[key] = std::move(plan);
}

void clear_plans() {
  std::lock_guard<std::mutex> guard(plans_lock);
  plans.clear();
}

void clear_backward_plans() {
  std::lock_guard<std::mutex> guard(plans_lock);
  backward_plans.clear();
}

int64_t plan_count() {
  std::lock_guard<std::mutex> guard(plans_lock);
  return static_cast<int64_t>(plans.size());
}

int64_t backward_plan_count() {
  std::lock_guard<std::mutex> guard(plans_lock);
  return static_cast<int64_t>(backward_plans.size());
}

// Made by install_cuda_forward / install_cuda_backward: each C++ kernel replaces nothing, it is registered
// only where the Python side did not register its own.
std::unique_ptr<torch::Library> forward_registration, backward_registration;

void install_cuda_forward() {
  if (forward_registration) return;
  forward_registration = std::make_unique<torch::Library>(torch::Library::IMPL, "fa4", c10::DispatchKey::CUDA,
                                                          __FILE__, __LINE__);
  forward_registration->impl("flash_attn_fwd_kernel", TORCH_FN(forward));
}

void install_cuda_backward() {
  if (backward_registration) return;
  backward_registration = std::make_unique<torch::Library>(torch::Library::IMPL, "fa4", c10::DispatchKey::CUDA,
                                                           __FILE__, __LINE__);
  backward_registration->impl("flash_attn_bwd", TORCH_FN(backward));
}

}  // namespace

TORCH_LIBRARY(fa4_native, m) {
  m.def("add_plan(int[] geometry, ScalarType dtype, int device, float softmax_scale, bool causal, "
        "int window_left, int window_right, float softcap, bool has_seqused_k, int function, int[] kinds, "
        "int[] values, float[] reals) -> ()",
        add_plan);
  m.def("clear_plans() -> ()", clear_plans);
  m.def("plan_count() -> int", plan_count);
  m.def("add_backward_plan(int[] geometry, ScalarType dtype, int device, float softmax_scale, bool causal, "
        "int window_left, int window_right, float softcap, bool deterministic, int[] functions, int[] arg_counts, "
        "int[] kinds, int[] values, float[] reals, Tensor[] scratch, int[] zeroed) -> ()",
        add_backward_plan);
  m.def("clear_backward_plans() -> ()", clear_backward_plans);
  m.def("backward_plan_count() -> int", backward_plan_count);
  m.def("install_cuda_forward() -> ()", install_cuda_forward);
  m.def("install_cuda_backward() -> ()", install_cuda_backward);
  // The kernel on any device, for tests (CPU tensors take the same path with no stream).
  m.def("forward(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal=False, int window_left=-1, "
        "int window_right=-1, float softcap=0.0, Tensor? seqused_k=None, Tensor? key_padding=None, "
        "Tensor? segment_ids=None) "
        "-> (Tensor, Tensor)",
        forward);
  m.def("backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, "
        "bool causal=False, int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? seqused_k=None, "
        "Tensor? key_padding=None, Tensor? segment_ids=None, Tensor? masking_buffer=None) "
        "-> (Tensor, Tensor, Tensor)",
        backward);
}
