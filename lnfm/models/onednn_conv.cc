// 'SAME' stride-1 3D convolutions on the CPU through oneDNN, as XLA FFI handlers.
//
// XLA:CPU has no fast 3D convolution; oneDNN's JIT kernels run the fine head's full-resolution
// block 2-3x faster than XLA's best form (docs/benchmarks.md). Activations stay channels-last
// (B, X, Y, Z, C), which oneDNN's brgconv/jit kernels read directly; only the small kernel is
// reordered into oneDNN's blocked layout. Built by `python -m lnfm.models.onednn_build`.
#include <dnnl.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

enum class Op { kForward, kInputGrad, kKernelGrad };

// One shape's primitive, its kernel reorders and the blocked-kernel scratch. XLA may run two
// convolutions of one shape at once, so each entry is used under its own lock.
struct Plan {
  std::mutex lock;
  dnnl::primitive conv;
  memory::desc src, dst;  // the activations, channels-last as JAX holds them: (B, X, Y, Z, Cin) and (..., Cout)
  memory::desc user_w, conv_w;
  std::unique_ptr<memory> blocked_w;  // null when oneDNN takes the user's kernel layout as it is
  dnnl::reorder to_blocked, from_blocked;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

Plan& PlanFor(Op op, int64_t b, int64_t x, int64_t y, int64_t z, int64_t cin, int64_t cout,
              int64_t k) {
  static std::mutex cache_lock;
  static std::map<Key, std::unique_ptr<Plan>> cache;
  std::lock_guard<std::mutex> guard(cache_lock);
  auto& slot = cache[Key{static_cast<int>(op), b, x, y, z, cin, cout, k}];
  if (slot) return *slot;

  auto plan = std::make_unique<Plan>();
  auto& eng = Engine();
  const memory::dims src{b, cin, x, y, z}, dst{b, cout, x, y, z}, wei{cout, cin, k, k, k};
  const memory::dims strides{1, 1, 1}, lo{(k - 1) / 2, (k - 1) / 2, (k - 1) / 2},
      hi{k / 2, k / 2, k / 2};
  const auto f32 = memory::data_type::f32;
  plan->src = memory::desc(src, f32, tag::ndhwc);
  plan->dst = memory::desc(dst, f32, tag::ndhwc);
  const memory::desc &src_md = plan->src, &dst_md = plan->dst;
  const memory::desc any_w(wei, f32, tag::any);
  plan->user_w = memory::desc(wei, f32, tag::dhwio);

  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, src_md, any_w,
                                      dst_md, strides, lo, hi),
      eng);
  if (op == Op::kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->conv_w = fwd.weights_desc();
  } else if (op == Op::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        dnnl::convolution_backward_data::desc(algo, src_md, any_w, dst_md, strides, lo, hi), eng,
        fwd);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->conv_w = pd.weights_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        dnnl::convolution_backward_weights::desc(algo, src_md, any_w, dst_md, strides, lo, hi),
        eng, fwd);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->conv_w = pd.diff_weights_desc();
  }
  if (plan->conv_w != plan->user_w) {
    plan->blocked_w = std::make_unique<memory>(plan->conv_w, eng);
    memory user(plan->user_w, eng, DNNL_MEMORY_NONE);
    if (op == Op::kKernelGrad) {
      plan->from_blocked = dnnl::reorder(*plan->blocked_w, user);
    } else {
      plan->to_blocked = dnnl::reorder(user, *plan->blocked_w);
    }
  }
  slot = std::move(plan);
  return *slot;
}

memory Wrap(const memory::desc& md, void* data) { return memory(md, Engine(), data); }

// (B, X, Y, Z, Cin) and (k, k, k, Cin, Cout) -> (B, X, Y, Z, Cout)
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 5 || wd.size() != 5) return ffi::Error::InvalidArgument("rank 5 expected");
  const int64_t cin = xd[4], cout = wd[4], k = wd[0];
  Plan& p = PlanFor(Op::kForward, xd[0], xd[1], xd[2], xd[3], cin, cout, k);
  std::lock_guard<std::mutex> guard(p.lock);
  dnnl::stream s(Engine());
  memory user_w = Wrap(p.user_w, w.untyped_data());
  if (p.blocked_w) p.to_blocked.execute(s, user_w, *p.blocked_w);
  p.conv.execute(s, {{DNNL_ARG_SRC, Wrap(p.src, x.untyped_data())},
                     {DNNL_ARG_WEIGHTS, p.blocked_w ? *p.blocked_w : user_w},
                     {DNNL_ARG_DST, Wrap(p.dst, y->untyped_data())}});
  s.wait();
  return ffi::Error::Success();
}

// dy (B, X, Y, Z, Cout) and w (k, k, k, Cin, Cout) -> dx (B, X, Y, Z, Cin)
ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx) {
  auto yd = dy.dimensions(), wd = w.dimensions();
  if (yd.size() != 5 || wd.size() != 5) return ffi::Error::InvalidArgument("rank 5 expected");
  const int64_t cin = wd[3], cout = wd[4], k = wd[0];
  Plan& p = PlanFor(Op::kInputGrad, yd[0], yd[1], yd[2], yd[3], cin, cout, k);
  std::lock_guard<std::mutex> guard(p.lock);
  dnnl::stream s(Engine());
  memory user_w = Wrap(p.user_w, w.untyped_data());
  if (p.blocked_w) p.to_blocked.execute(s, user_w, *p.blocked_w);
  p.conv.execute(s, {{DNNL_ARG_DIFF_DST, Wrap(p.dst, dy.untyped_data())},
                     {DNNL_ARG_WEIGHTS, p.blocked_w ? *p.blocked_w : user_w},
                     {DNNL_ARG_DIFF_SRC, Wrap(p.src, dx->untyped_data())}});
  s.wait();
  return ffi::Error::Success();
}

// x (B, X, Y, Z, Cin) and dy (B, X, Y, Z, Cout) -> dw (k, k, k, Cin, Cout)
ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 5 || yd.size() != 5 || wd.size() != 5)
    return ffi::Error::InvalidArgument("rank 5 expected");
  const int64_t cin = xd[4], cout = yd[4], k = wd[0];
  Plan& p = PlanFor(Op::kKernelGrad, xd[0], xd[1], xd[2], xd[3], cin, cout, k);
  std::lock_guard<std::mutex> guard(p.lock);
  dnnl::stream s(Engine());
  memory user_w = Wrap(p.user_w, dw->untyped_data());
  p.conv.execute(s, {{DNNL_ARG_SRC, Wrap(p.src, x.untyped_data())},
                     {DNNL_ARG_DIFF_DST, Wrap(p.dst, dy.untyped_data())},
                     {DNNL_ARG_DIFF_WEIGHTS, p.blocked_w ? *p.blocked_w : user_w}});
  if (p.blocked_w) p.from_blocked.execute(s, *p.blocked_w, user_w);
  s.wait();
  return ffi::Error::Success();
}

// oneDNN runs on libgomp's OpenMP teams, one kept per thread that starts a parallel region (here XLA's threads).
// PyTorch in the same process shares libgomp: once those teams count more threads than cores, libgomp stops spinning
// for every team, and PyTorch's step ran 2x slower after one of ours. A thread of our own per call frees its team
// but made the finetune job's step 3x slower (0.17 against 0.054 s), so a process that trains PyTorch models beside
// LNFM's calls `onednn.keep_off()` instead (lnfm/models/onednn.py).
template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

ffi::Error ForwardChecked(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  return Guarded([&] { return Forward(x, w, y); });
}
ffi::Error InputGradChecked(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx) {
  return Guarded([&] { return InputGrad(dy, w, dx); });
}
ffi::Error KernelGradChecked(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dw) {
  return Guarded([&] { return KernelGrad(x, dy, dw); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnfmConv3dForward, ForwardChecked,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LnfmConv3dInputGrad, InputGradChecked,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LnfmConv3dKernelGrad, KernelGradChecked,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
