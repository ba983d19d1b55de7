// The pybind11 module fastvis._C: thin. Objects come in through DLPack
// (__dlpack__ / __dlpack_device__: torch tensors, NumPy arrays, ...), become
// fastvis::TensorView, the core is called with the GIL released, and
// fastvis::Error is translated to ValueError / TypeError / RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "bindings/dlpack.h"
#include "core/blas.h"
#include "core/profile.h"
#include "fastvis/fastvis.h"

namespace py = pybind11;
using namespace fastvis;

namespace {

// Keeps the DLPack capsules of one call alive while the core reads the views.
struct Borrowed {
  std::vector<py::object> keep;

  // obj: an array with __dlpack__, or a "dltensor" capsule itself (what
  // torch.utils.dlpack.to_dlpack returns: the Python ops pass those, as the protocol's
  // Python-level methods cost ~20x more per tensor). The capsule is kept, never consumed:
  // its producer keeps owning the memory.
  TensorView view(const py::handle& obj, const char* name) {
    py::object capsule;
    if (PyCapsule_CheckExact(obj.ptr())) {
      capsule = py::reinterpret_borrow<py::object>(obj);
    } else {
      if (!py::hasattr(obj, "__dlpack__"))
        detail::throw_error(ErrorKind::Type, name,
                            ": expected an array supporting DLPack (a torch.Tensor or a NumPy "
                            "array), got ",
                            std::string(py::str(py::type::of(obj).attr("__name__"))));
      int dev_type = kDLCPU;
      if (py::hasattr(obj, "__dlpack_device__")) {
        py::tuple dev = obj.attr("__dlpack_device__")();
        dev_type = dev[0].cast<int>();
      }
      if (dev_type == kDLCUDA || dev_type == kDLCUDAManaged)
        capsule = obj.attr("__dlpack__")(py::arg("stream") = -1);  // the caller orders streams
      else
        capsule = obj.attr("__dlpack__")();
    }
    keep.push_back(capsule);
    if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
      detail::throw_error(ErrorKind::Type, name,
                          ": not a valid 'dltensor' DLPack capsule (one already consumed, or "
                          "__dlpack__ returned something else)");
    auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    const DLTensor& t = mt->dl_tensor;
    TensorView v;
    FV_CHECK_VALUE(t.ndim >= 0 && t.ndim <= kMaxDims, name, ": at most ", kMaxDims,
                   " dimensions are supported, got ", t.ndim);
    FV_CHECK_TYPE(t.dtype.lanes == 1, name, ": vector dtypes (lanes > 1) are not supported");
    const int code = t.dtype.code, bits = t.dtype.bits;
    if (code == kDLFloat && bits == 32) v.dtype = DType::Float32;
    else if (code == kDLFloat && bits == 64) v.dtype = DType::Float64;
    else if (code == kDLFloat && bits == 16) v.dtype = DType::Float16;
    else if (code == kDLBfloat && bits == 16) v.dtype = DType::BFloat16;
    else if (code == kDLUInt && bits == 8) v.dtype = DType::UInt8;
    else
      detail::throw_error(ErrorKind::Type, name, ": unsupported dtype (DLPack code ", code,
                          ", ", bits, " bits); expected float32, float64, bfloat16 or float16");
    if (t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost) {
      v.device = Device{DeviceType::CPU, 0};
    } else if (t.device.device_type == kDLCUDA || t.device.device_type == kDLCUDAManaged) {
      v.device = Device{DeviceType::CUDA, t.device.device_id};
    } else {
      detail::throw_error(ErrorKind::Value, name, ": unsupported device (DLPack type ",
                          t.device.device_type, "); expected CPU or CUDA memory");
    }
    v.data = static_cast<char*>(t.data) + t.byte_offset;
    v.ndim = t.ndim;
    int64_t st = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      v.shape[d] = t.shape[d];
      v.strides[d] = t.strides ? t.strides[d] : st;
      st *= t.shape[d];
    }
    return v;
  }
};

DepthwiseConv2dParams make_params(const std::array<int64_t, 2>& stride,
                                  const std::array<int64_t, 4>& padding,
                                  const std::array<int64_t, 2>& dilation) {
  DepthwiseConv2dParams p;
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_top = padding[0];
  p.pad_bottom = padding[1];
  p.pad_left = padding[2];
  p.pad_right = padding[3];
  p.dilation_h = dilation[0];
  p.dilation_w = dilation[1];
  return p;
}

// Host scratch for calls given none: one grow-only buffer per calling thread, kept up to
// kKeepScratch bytes (larger needs get a buffer of their own, freed after the call), so
// successive calls reuse pages instead of faulting fresh ones in. A binding call is
// synchronous and uses one Scratch, so a thread never needs its buffer twice at once.
// Passing None spares the Python layer a size query, a slice and a DLPack export per call
// (~20-40 us each way after a kernel has evicted the interpreter's data from cache).
// 64-byte aligned, as torch's buffers are: the core carves its regions at 64-byte offsets
// from the base, and a misaligned base split every vector load of its packed tiles across
// two cache lines (13x13 depthwise, N=8: 8.7 -> 15 ms before this was aligned).
// 128 MiB: the tiled MLP's backward with GRN at UniRepLKNet-T's last stage, N=8, needs
// ~69 MB (two runs of 2 x 768 x 3072 weight-gradient partials plus GRN's stores), and a
// fresh buffer that size costs its page faults on every call (~10 ms per 20 MB here).
constexpr size_t kKeepScratch = size_t(128) << 20;
struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};
using HostBuffer = std::unique_ptr<void, AlignedFree>;
HostBuffer host_buffer(size_t bytes) { return HostBuffer(::operator new(bytes, std::align_val_t(64))); }
struct ThreadScratch {
  HostBuffer buf;
  size_t bytes = 0;
};
thread_local ThreadScratch t_scratch;

// Caller-provided scratch (a uint8 array) or, when None, host memory owned here.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  HostBuffer owned;

  Scratch(Borrowed& b, const py::object& obj, size_t need, const TensorView& like) {
    if (obj.is_none()) {
      if (like.device.type == DeviceType::CUDA && need > 0)
        detail::throw_error(ErrorKind::Value,
                            "scratch: CUDA tensors need a caller-allocated CUDA scratch buffer of ",
                            need, " bytes");
      if (need > kKeepScratch) {
        owned = host_buffer(need);
        ptr = owned.get();
        bytes = need;
      } else if (need > 0) {
        if (t_scratch.bytes < need) {
          const size_t grow = std::max(need, size_t(1) << 20);
          t_scratch.buf.reset();  // release the old buffer before taking the new one
          t_scratch.bytes = 0;
          t_scratch.buf = host_buffer(grow);
          t_scratch.bytes = grow;
        }
        ptr = t_scratch.buf.get();
        bytes = t_scratch.bytes;
      }
      return;
    }
    TensorView s = b.view(obj, "scratch");
    FV_CHECK_TYPE(s.dtype == DType::UInt8, "scratch: expected a uint8 buffer, got ",
                  dtype_name(s.dtype));
    FV_CHECK_VALUE(s.is_contiguous(), "scratch: must be contiguous");
    FV_CHECK_VALUE(s.device == like.device, "scratch: expected memory on ",
                   device_name(like.device), ", got ", device_name(s.device));
    ptr = s.data;
    bytes = static_cast<size_t>(s.numel());
  }
};

// Views of a sequence of optional tensors (None -> nullptr): out[i] points at views[i].
void optional_views(Borrowed& b, const py::sequence& seq, int count, const char* const* names,
                    TensorView* views, const TensorView** out) {
  for (int i = 0; i < count; ++i) {
    py::object o = seq[i];
    out[i] = o.is_none() ? nullptr : (views[i] = b.view(o, names[i]), &views[i]);
  }
}

void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }

// A chain of fused-block forwards in one call (CPU inference): block i reads ys[i - 1] (x
// for i = 0) and writes ys[i]. Args holds one block's views (built by make from the input
// and the block's entry of `entries` items); need gives its scratch size, run runs it. All
// views are taken with the GIL, then the blocks run without it, one scratch for all.
template <class Args, class Make, class Need, class Run>
void run_chain(const py::object& x, const py::sequence& blocks, const py::sequence& ys,
               size_t entries, const char* entry_doc, Make make, Need need, Run run) {
  const size_t n = py::len(blocks);
  FV_CHECK_VALUE(n >= 1, "blocks: expected at least one block");
  FV_CHECK_VALUE(py::len(ys) == n, "ys: expected one output per block (", n, "), got ",
                 py::len(ys));
  std::vector<std::unique_ptr<Args>> args;
  std::vector<TensorView> yv(n);
  size_t bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    py::sequence blk = blocks[i];
    FV_CHECK_VALUE(py::len(blk) == entries, "blocks[", i, "]: expected ", entry_doc, ", got ",
                   py::len(blk), " entries");
    args.emplace_back(make(i == 0 ? x : py::object(ys[i - 1]), blk));
    FV_CHECK_VALUE(args[i]->x.device.type == DeviceType::CPU, "blocks: CPU tensors only");
    yv[i] = args[i]->b.view(ys[i], "y");
    bytes = std::max(bytes, need(*args[i]));
  }
  Scratch sc(args[0]->b, py::none(), bytes, args[0]->x);
  py::gil_scoped_release nogil;
  for (size_t i = 0; i < n; ++i) run(*args[i], yv[i], sc.ptr, sc.bytes);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvis core bindings (DLPack in, core call out)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastvis::Error& e) {
      PyObject* type = PyExc_RuntimeError;
      if (e.kind() == ErrorKind::Value) type = PyExc_ValueError;
      if (e.kind() == ErrorKind::Type) type = PyExc_TypeError;
      PyErr_SetString(type, e.what());
    }
  });

  m.def("version", [] { return std::string(fastvis::version()); });
  // The fused kernels' opt-in phase profiler (core/profile.h): wall time per phase summed
  // over threads, and the number of timed sections.
  m.def("profile_enable", [](bool on) { fastvis::prof::set_enabled(on); }, py::arg("on"));
  m.def("profile_reset", [] { fastvis::prof::reset(); });
  m.def("profile_read", [] {
    py::dict d;
    for (int i = 0; i < fastvis::prof::kNumPhases; ++i)
      if (fastvis::prof::calls(i) > 0)
        d[fastvis::prof::phase_name(i)] =
            py::make_tuple(fastvis::prof::total_ns(i) * 1e-9, fastvis::prof::calls(i));
    return d;
  });
  m.def("blas_config", [] { return fastvis::core::blas_config(); });
  // The float GEMM of the fused blocks: addresses of a Fortran-interface sgemm and of an
  // optional per-thread thread-count setter (0 for none), checked by the core before use;
  // fn = 0 goes back to OpenBLAS. fastvis._runtime passes PyTorch's MKL here.
  m.def("set_sgemm_provider",
        [](std::uintptr_t fn, std::uintptr_t threads, const std::string& name) {
          fastvis::core::set_sgemm_provider(reinterpret_cast<fastvis::core::FortranSgemm>(fn),
                                            reinterpret_cast<fastvis::core::SetThreadsLocal>(threads), name);
        },
        py::arg("fn"), py::arg("set_threads_local") = 0, py::arg("name") = "");
  m.def("sgemm_provider", [] { return fastvis::core::sgemm_provider(); });
  // GFLOP/s of the core's float GEMM (core::gemm: the own AVX-512 kernels where active, else
  // the BLAS / provider; the name predates them) on one thread for C[m x n] = A[m x k]
  // B[k x n]^T (or A B with nn), best of `reps` calls: the ceiling the tile GEMMs are
  // compared with.
  m.def("blas_sgemm_gflops",
        [](int64_t m_, int64_t n_, int64_t k_, int reps, bool nn) {
          py::gil_scoped_release nogil;
          return fastvis::core::gemm_gflops(m_, n_, k_, reps, nn);
        },
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("reps") = 5, py::arg("nn") = false);
  // The core's float GEMM as the fused blocks call it (core::gemm: the own kernel where it
  // applies, else the BLAS / provider), on 2-D float32 arrays with unit column stride: c =
  // alpha op(a) op(b) + beta c. For tests and benchmarks.
  m.def("sgemm",
        [](bool ta, bool tb, py::object a, py::object b, py::object c, double alpha, double beta) {
          Borrowed h;
          const TensorView va = h.view(a, "a"), vb = h.view(b, "b"), vc = h.view(c, "c");
          for (const TensorView* t : {&va, &vb, &vc}) {
            FV_CHECK_TYPE(t->dtype == DType::Float32, "sgemm: expected float32 arrays, got ", t->describe());
            FV_CHECK_VALUE(t->ndim == 2 && t->strides[1] == 1 && t->strides[0] >= std::max<int64_t>(1, t->shape[1]) &&
                               t->device.type == DeviceType::CPU,
                           "sgemm: expected 2-D CPU arrays with unit column stride, got ", t->describe());
          }
          const int64_t m_ = vc.shape[0], n_ = vc.shape[1], k_ = ta ? va.shape[0] : va.shape[1];
          FV_CHECK_VALUE((ta ? va.shape[1] : va.shape[0]) == m_ && (tb ? vb.shape[1] : vb.shape[0]) == k_ &&
                             (tb ? vb.shape[0] : vb.shape[1]) == n_,
                         "sgemm: shapes do not chain: a ", va.describe(), ", b ", vb.describe(), ", c ",
                         vc.describe());
          py::gil_scoped_release nogil;
          fastvis::core::gemm(ta ? fastvis::core::Op::T : fastvis::core::Op::N,
                              tb ? fastvis::core::Op::T : fastvis::core::Op::N, m_, n_, k_,
                              static_cast<float>(alpha), static_cast<const float*>(va.data), va.strides[0],
                              static_cast<const float*>(vb.data), vb.strides[0], static_cast<float>(beta),
                              static_cast<float*>(vc.data), vc.strides[0]);
        },
        py::arg("ta"), py::arg("tb"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("alpha") = 1.0,
        py::arg("beta") = 0.0);
  // The core's own AVX-512 gemm(N, N) kernel (core/blas.h): -1 auto, 0 off, 1 on.
  m.def("set_own_gemm", &fastvis::core::set_own_gemm, py::arg("mode"));
  m.def("own_gemm_active", &fastvis::core::own_gemm_active);
  m.def("own_gemm_available", &fastvis::core::own_gemm_available);
  m.def("set_num_threads", &fastvis::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &fastvis::get_num_threads);
  m.def("cuda_device_count", &fastvis::cuda_device_count);
  m.def("build_info", [] {
    py::dict d;
    d["version"] = std::string(fastvis::version());
    d["cpu_isa_compiled"] = fastvis::cpu_isa_compiled();
    d["cpu_isa_selected"] = fastvis::cpu_isa_selected();
    d["cuda"] = fastvis::cuda_compiled();
    d["cuda_archs"] = fastvis::cuda_archs();
    d["threading"] = fastvis::threading_backend();
    return d;
  });

  using A2 = std::array<int64_t, 2>;
  using A4 = std::array<int64_t, 4>;

  m.def(
      "dwconv_output_shape",
      [](py::object x, py::object w, A2 stride, A4 padding, A2 dilation) {
        Borrowed b;
        auto s = depthwise_conv2d_shape(b.view(x, "x"), b.view(w, "weight"),
                                        make_params(stride, padding, dilation));
        return py::make_tuple(s.n, s.c, s.oh, s.ow);
      },
      py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("padding"), py::arg("dilation"));

  m.def(
      "dwconv_forward_scratch_bytes",
      [](py::object x, py::object w, A2 stride, A4 padding, A2 dilation) {
        Borrowed b;
        return depthwise_conv2d_forward_scratch_bytes(b.view(x, "x"), b.view(w, "weight"),
                                                      make_params(stride, padding, dilation));
      },
      py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("padding"), py::arg("dilation"));

  m.def(
      "dwconv_forward",
      [](py::object x, py::object w, py::object bias, py::object y, A2 stride, A4 padding,
         A2 dilation, py::object scratch, uintptr_t stream) {
        Borrowed b;
        const auto p = make_params(stride, padding, dilation);
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), yv = b.view(y, "y");
        TensorView bv;
        if (!bias.is_none()) bv = b.view(bias, "bias");
        const size_t need = depthwise_conv2d_forward_scratch_bytes(xv, wv, p);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        depthwise_conv2d_forward(xv, wv, bias.is_none() ? nullptr : &bv, yv, p, sc.ptr, sc.bytes,
                                 as_stream(stream));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("scratch") = py::none(),
      py::arg("stream") = 0);

  m.def(
      "dwconv_backward_input_scratch_bytes",
      [](py::object gy, py::object w, py::object gx, A2 stride, A4 padding, A2 dilation) {
        Borrowed b;
        return depthwise_conv2d_backward_input_scratch_bytes(
            b.view(gy, "grad_y"), b.view(w, "weight"), b.view(gx, "grad_x"),
            make_params(stride, padding, dilation));
      },
      py::arg("grad_y"), py::arg("weight"), py::arg("grad_x"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"));

  m.def(
      "dwconv_backward_input",
      [](py::object gy, py::object w, py::object gx, A2 stride, A4 padding, A2 dilation,
         py::object scratch, uintptr_t stream) {
        Borrowed b;
        const auto p = make_params(stride, padding, dilation);
        TensorView gyv = b.view(gy, "grad_y"), wv = b.view(w, "weight"),
                   gxv = b.view(gx, "grad_x");
        const size_t need = depthwise_conv2d_backward_input_scratch_bytes(gyv, wv, gxv, p);
        Scratch sc(b, scratch, need, gxv);
        py::gil_scoped_release nogil;
        depthwise_conv2d_backward_input(gyv, wv, gxv, p, sc.ptr, sc.bytes, as_stream(stream));
      },
      py::arg("grad_y"), py::arg("weight"), py::arg("grad_x"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("scratch") = py::none(),
      py::arg("stream") = 0);

  m.def(
      "dwconv_backward_weight_scratch_bytes",
      [](py::object gy, py::object x, py::object gw, A2 stride, A4 padding, A2 dilation) {
        Borrowed b;
        return depthwise_conv2d_backward_weight_scratch_bytes(
            b.view(gy, "grad_y"), b.view(x, "x"), b.view(gw, "grad_weight"),
            make_params(stride, padding, dilation));
      },
      py::arg("grad_y"), py::arg("x"), py::arg("grad_weight"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"));

  m.def(
      "dwconv_backward_weight",
      [](py::object gy, py::object x, py::object gw, py::object gb, A2 stride, A4 padding,
         A2 dilation, py::object scratch, uintptr_t stream) {
        Borrowed b;
        const auto p = make_params(stride, padding, dilation);
        TensorView gyv = b.view(gy, "grad_y"), xv = b.view(x, "x"),
                   gwv = b.view(gw, "grad_weight");
        TensorView gbv;
        if (!gb.is_none()) gbv = b.view(gb, "grad_bias");
        const size_t need = depthwise_conv2d_backward_weight_scratch_bytes(gyv, xv, gwv, p);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        depthwise_conv2d_backward_weight(gyv, xv, gwv, gb.is_none() ? nullptr : &gbv, p, sc.ptr,
                                         sc.bytes, as_stream(stream));
      },
      py::arg("grad_y"), py::arg("x"), py::arg("grad_weight"), py::arg("grad_bias"),
      py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("scratch") = py::none(), py::arg("stream") = 0);

  m.def(
      "dwconv_forward_reference",
      [](py::object x, py::object w, py::object bias, py::object y, A2 stride, A4 padding,
         A2 dilation) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), yv = b.view(y, "y");
        TensorView bv;
        if (!bias.is_none()) bv = b.view(bias, "bias");
        const auto p = make_params(stride, padding, dilation);
        py::gil_scoped_release nogil;
        depthwise_conv2d_forward_reference(xv, wv, bias.is_none() ? nullptr : &bv, yv, p);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"));

  m.def(
      "dwconv_backward_input_reference",
      [](py::object gy, py::object w, py::object gx, A2 stride, A4 padding, A2 dilation) {
        Borrowed b;
        TensorView gyv = b.view(gy, "grad_y"), wv = b.view(w, "weight"),
                   gxv = b.view(gx, "grad_x");
        const auto p = make_params(stride, padding, dilation);
        py::gil_scoped_release nogil;
        depthwise_conv2d_backward_input_reference(gyv, wv, gxv, p);
      },
      py::arg("grad_y"), py::arg("weight"), py::arg("grad_x"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"));

  m.def(
      "dwconv_backward_weight_reference",
      [](py::object gy, py::object x, py::object gw, py::object gb, A2 stride, A4 padding,
         A2 dilation) {
        Borrowed b;
        TensorView gyv = b.view(gy, "grad_y"), xv = b.view(x, "x"),
                   gwv = b.view(gw, "grad_weight");
        TensorView gbv;
        if (!gb.is_none()) gbv = b.view(gb, "grad_bias");
        const auto p = make_params(stride, padding, dilation);
        py::gil_scoped_release nogil;
        depthwise_conv2d_backward_weight_reference(gyv, xv, gwv, gb.is_none() ? nullptr : &gbv,
                                                   p);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("grad_weight"), py::arg("grad_bias"),
      py::arg("stride"), py::arg("padding"), py::arg("dilation"));

  // ------------------------------------------------------------ layer_norm_channels
  // Optional tensors are None; mean / rstd are (N, H, W) in the statistics dtype.
  auto opt_view = [](Borrowed& b, const py::object& o, TensorView& v, const char* name)
      -> const TensorView* {
    if (o.is_none()) return nullptr;
    v = b.view(o, name);
    return &v;
  };

  // ---- linear (fastvis/linear.h): y = x weight^T + bias on (M, K) rows; bias None or (N,)
  m.def(
      "linear_forward",
      [opt_view](py::object x, py::object w, py::object bias, py::object y) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), yv = b.view(y, "y"), bv;
        const TensorView* bp = opt_view(b, bias, bv, "bias");
        py::gil_scoped_release nogil;
        linear_forward(xv, wv, bp, yv);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"));

  // ---- patch convolution (stride == kernel by default; any stride / zero padding): forward, weight gradient
  auto pc_params = [](const std::vector<int64_t>& stride, const std::vector<int64_t>& padding) {
    FV_CHECK_VALUE(stride.size() == 2 && padding.size() == 2,
                   "stride and padding: expected two values each (h, w)");
    PatchConv2dParams p;
    p.stride_h = stride[0];
    p.stride_w = stride[1];
    p.pad_h = padding[0];
    p.pad_w = padding[1];
    return p;
  };
  m.def("patch_conv2d_forward_scratch_bytes",
        [pc_params](py::object x, py::object w, std::vector<int64_t> stride,
                    std::vector<int64_t> padding) {
          Borrowed b;
          return patch_conv2d_forward_scratch_bytes(b.view(x, "x"), b.view(w, "weight"),
                                                    pc_params(stride, padding));
        },
        py::arg("x"), py::arg("weight"), py::arg("stride") = std::vector<int64_t>{0, 0},
        py::arg("padding") = std::vector<int64_t>{0, 0});
  m.def(
      "patch_conv2d_forward",
      [opt_view, pc_params](py::object x, py::object w, py::object bias, py::object y,
                            py::object scratch, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, int norm, py::object norm_weight,
                            py::object norm_bias, double norm_eps) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), yv = b.view(y, "y"), bv, nwv, nbv;
        const TensorView* bp = opt_view(b, bias, bv, "bias");
        PatchConv2dParams p = pc_params(stride, padding);
        FV_CHECK_VALUE(norm >= 0 && norm <= 2, "norm: expected 0 (none), 1 (before) or 2 (after), got ",
                       norm);
        p.norm = static_cast<PatchNorm>(norm);
        p.norm_weight = opt_view(b, norm_weight, nwv, "norm_weight");
        p.norm_bias = opt_view(b, norm_bias, nbv, "norm_bias");
        p.norm_eps = norm_eps;
        const size_t need = patch_conv2d_forward_scratch_bytes(xv, wv, p);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        patch_conv2d_forward(xv, wv, bp, yv, sc.ptr, sc.bytes, p);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
      py::arg("scratch") = py::none(), py::arg("stride") = std::vector<int64_t>{0, 0},
      py::arg("padding") = std::vector<int64_t>{0, 0}, py::arg("norm") = 0,
      py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none(),
      py::arg("norm_eps") = 1e-6);

  m.def("patch_conv2d_backward_weight_scratch_bytes",
        [pc_params](py::object x, py::object w, std::vector<int64_t> stride,
                    std::vector<int64_t> padding) {
          Borrowed b;
          return patch_conv2d_backward_weight_scratch_bytes(b.view(x, "x"), b.view(w, "weight"),
                                                            pc_params(stride, padding));
        },
        py::arg("x"), py::arg("weight"), py::arg("stride") = std::vector<int64_t>{0, 0},
        py::arg("padding") = std::vector<int64_t>{0, 0});
  m.def(
      "patch_conv2d_backward_weight",
      [opt_view, pc_params](py::object grad_y, py::object x, py::object w, py::object grad_w,
                            py::object grad_bias, py::object scratch, std::vector<int64_t> stride,
                            std::vector<int64_t> padding) {
        Borrowed b;
        TensorView gyv = b.view(grad_y, "grad_y"), xv = b.view(x, "x"), wv = b.view(w, "weight"),
                   gwv = b.view(grad_w, "grad_weight"), gbv;
        const TensorView* gbp = opt_view(b, grad_bias, gbv, "grad_bias");
        const PatchConv2dParams p = pc_params(stride, padding);
        const size_t need = patch_conv2d_backward_weight_scratch_bytes(xv, wv, p);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        patch_conv2d_backward_weight(gyv, xv, wv, gwv, gbp, sc.ptr, sc.bytes, p);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("grad_weight"),
      py::arg("grad_bias"), py::arg("scratch") = py::none(),
      py::arg("stride") = std::vector<int64_t>{0, 0}, py::arg("padding") = std::vector<int64_t>{0, 0});

  m.def("layer_norm_channels_forward_scratch_bytes",
        [](py::object x) {
          Borrowed b;
          return layer_norm_channels_forward_scratch_bytes(b.view(x, "x"));
        },
        py::arg("x"));

  m.def(
      "layer_norm_channels_forward",
      [opt_view](py::object x, py::object w, py::object bias, double eps, py::object y,
                 py::object mean, py::object rstd, py::object scratch) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), yv = b.view(y, "y"), wv, bv, mv, rv;
        const TensorView* wp = opt_view(b, w, wv, "weight");
        const TensorView* bp = opt_view(b, bias, bv, "bias");
        const TensorView* mp = opt_view(b, mean, mv, "mean");
        const TensorView* rp = opt_view(b, rstd, rv, "rstd");
        layer_norm_channels_shape(xv, wp, bp, eps);
        const size_t need = layer_norm_channels_forward_scratch_bytes(xv);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        layer_norm_channels_forward(xv, wp, bp, eps, yv, mp, rp, sc.ptr, sc.bytes);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"),
      py::arg("mean") = py::none(), py::arg("rstd") = py::none(),
      py::arg("scratch") = py::none());

  m.def("layer_norm_channels_backward_scratch_bytes",
        [](py::object x) {
          Borrowed b;
          return layer_norm_channels_backward_scratch_bytes(b.view(x, "x"));
        },
        py::arg("x"));

  m.def(
      "layer_norm_channels_backward",
      [opt_view](py::object gy, py::object x, py::object w, py::object mean, py::object rstd,
                 py::object gx, py::object gw, py::object gb, py::object scratch) {
        Borrowed b;
        TensorView gyv = b.view(gy, "grad_y"), xv = b.view(x, "x"), mv = b.view(mean, "mean"),
                   rv = b.view(rstd, "rstd"), wv, gxv, gwv, gbv;
        const TensorView* wp = opt_view(b, w, wv, "weight");
        const TensorView* gxp = opt_view(b, gx, gxv, "grad_x");
        const TensorView* gwp = opt_view(b, gw, gwv, "grad_weight");
        const TensorView* gbp = opt_view(b, gb, gbv, "grad_bias");
        const size_t need = layer_norm_channels_backward_scratch_bytes(xv);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        layer_norm_channels_backward(gyv, xv, wp, mv, rv, gxp, gwp, gbp, sc.ptr, sc.bytes);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
      py::arg("scratch") = py::none());

  m.def(
      "layer_norm_channels_forward_reference",
      [opt_view](py::object x, py::object w, py::object bias, double eps, py::object y,
                 py::object mean, py::object rstd) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), yv = b.view(y, "y"), wv, bv, mv, rv;
        const TensorView* wp = opt_view(b, w, wv, "weight");
        const TensorView* bp = opt_view(b, bias, bv, "bias");
        const TensorView* mp = opt_view(b, mean, mv, "mean");
        const TensorView* rp = opt_view(b, rstd, rv, "rstd");
        py::gil_scoped_release nogil;
        layer_norm_channels_forward_reference(xv, wp, bp, eps, yv, mp, rp);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"),
      py::arg("mean") = py::none(), py::arg("rstd") = py::none());

  m.def(
      "layer_norm_channels_backward_reference",
      [opt_view](py::object gy, py::object x, py::object w, double eps, py::object gx,
                 py::object gw, py::object gb) {
        Borrowed b;
        TensorView gyv = b.view(gy, "grad_y"), xv = b.view(x, "x"), wv, gxv, gwv, gbv;
        const TensorView* wp = opt_view(b, w, wv, "weight");
        const TensorView* gxp = opt_view(b, gx, gxv, "grad_x");
        const TensorView* gwp = opt_view(b, gw, gwv, "grad_weight");
        const TensorView* gbp = opt_view(b, gb, gbv, "grad_bias");
        py::gil_scoped_release nogil;
        layer_norm_channels_backward_reference(gyv, xv, wp, eps, gxp, gwp, gbp);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("grad_x"),
      py::arg("grad_weight"), py::arg("grad_bias"));

  // ------------------------------------------------------------ convnext_block
  // weights: (dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
  // fc2_bias, gamma, drop_scale, grn_weight, grn_bias), None where absent; grads: (x,
  // dw_weight, dw_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
  // gamma, grn_weight, grn_bias), None where not wanted.
  struct BlockArgs {
    Borrowed b;
    TensorView x, wv[16], gv[12];
    ConvNeXtBlockWeights w;
    ConvNeXtBlockGrads g;
    ConvNeXtBlockParams p;
    // weights: the 12 above, optionally followed by (se_down_weight, se_down_bias,
    // se_up_weight, se_up_bias).
    BlockArgs(const py::object& xo, const py::sequence& ws, double eps, bool tanh_gelu,
              double grn_eps, bool layer_norm = true) {
      static const char* names[16] = {"dw_weight", "dw_bias", "norm_weight", "norm_bias",
                                      "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
                                      "gamma", "drop_scale", "grn_weight", "grn_bias",
                                      "se_down_weight", "se_down_bias", "se_up_weight",
                                      "se_up_bias"};
      const int nw = static_cast<int>(py::len(ws));
      FV_CHECK_VALUE(nw == 12 || nw == 16, "weights: expected 12 or 16 entries, got ", nw);
      x = b.view(xo, "x");
      const TensorView* ptr[16] = {};
      optional_views(b, ws, nw, names, wv, ptr);
      w = ConvNeXtBlockWeights{ptr[0], ptr[1], ptr[2],  ptr[3],  ptr[4],  ptr[5],
                               ptr[6], ptr[7], ptr[8],  ptr[9],  ptr[10], ptr[11],
                               ptr[12], ptr[13], ptr[14], ptr[15]};
      p.eps = eps;
      p.gelu_tanh = tanh_gelu;
      p.grn_eps = grn_eps;
      p.layer_norm = layer_norm;
    }
    void grads(const py::sequence& gs) {
      static const char* names[12] = {"grad_x", "grad_dw_weight", "grad_dw_bias",
                                      "grad_norm_weight", "grad_norm_bias", "grad_fc1_weight",
                                      "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias",
                                      "grad_gamma", "grad_grn_weight", "grad_grn_bias"};
      FV_CHECK_VALUE(py::len(gs) == 12, "grads: expected 12 entries, got ", py::len(gs));
      const TensorView* ptr[12];
      optional_views(b, gs, 12, names, gv, ptr);
      g = ConvNeXtBlockGrads{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4],  ptr[5],
                             ptr[6], ptr[7], ptr[8], ptr[9], ptr[10], ptr[11]};
    }
  };

  m.def("convnext_block_forward_scratch_bytes",
        [](py::object x, py::sequence ws, double eps, bool tanh_gelu, double grn_eps,
           bool layer_norm) {
          BlockArgs a(x, ws, eps, tanh_gelu, grn_eps, layer_norm);
          return convnext_block_forward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("eps"), py::arg("tanh_gelu"),
        py::arg("grn_eps") = 1e-6, py::arg("layer_norm") = true);
  m.def(
      "convnext_block_forward",
      [](py::object x, py::sequence ws, double eps, bool tanh_gelu, py::object y,
         py::object scratch, double grn_eps, uintptr_t stream, bool layer_norm,
         py::object grn_stats) {
        BlockArgs a(x, ws, eps, tanh_gelu, grn_eps, layer_norm);
        TensorView yv = a.b.view(y, "y");
        TensorView sv;
        if (!grn_stats.is_none()) sv = a.b.view(grn_stats, "grn_stats");
        const size_t need = convnext_block_forward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        convnext_block_forward(a.x, a.w, a.p, yv, sc.ptr, sc.bytes, as_stream(stream),
                               grn_stats.is_none() ? nullptr : &sv);
      },
      py::arg("x"), py::arg("weights"), py::arg("eps"), py::arg("tanh_gelu"), py::arg("y"),
      py::arg("scratch") = py::none(), py::arg("grn_eps") = 1e-6, py::arg("stream") = 0,
      py::arg("layer_norm") = true, py::arg("grn_stats") = py::none());
  // A chain of blocks for inference, one call: block i reads ys[i - 1] (x for i = 0) and
  // writes ys[i]; blocks[i] = (weights, eps, tanh_gelu, grn_eps) as for
  // convnext_block_forward. An output may be reused two blocks later (ping-pong buffers),
  // never by the block that reads it (the core refuses a y overlapping its x).
  m.def(
      "convnext_block_forward_chain",
      [](py::object x, py::sequence blocks, py::sequence ys) {
        run_chain<BlockArgs>(
            x, blocks, ys, 4, "(weights, eps, tanh_gelu, grn_eps)",
            [](const py::object& xi, const py::sequence& blk) {
              return new BlockArgs(xi, blk[0], blk[1].cast<double>(), blk[2].cast<bool>(),
                                   blk[3].cast<double>());
            },
            [](const BlockArgs& a) { return convnext_block_forward_scratch_bytes(a.x, a.w, a.p); },
            [](const BlockArgs& a, const TensorView& y, void* sp, size_t sb) {
              convnext_block_forward(a.x, a.w, a.p, y, sp, sb);
            });
      },
      py::arg("x"), py::arg("blocks"), py::arg("ys"));
  // The GRN blocks' store budget (fastvis/convnext_block.h: set_grn_store_bytes).
  m.def("set_grn_store_bytes", [](size_t bytes) { set_grn_store_bytes(bytes); }, py::arg("bytes"));
  m.def("grn_store_bytes", [] { return grn_store_bytes(); });
  m.def("convnext_block_backward_scratch_bytes",
        [](py::object x, py::sequence ws, double eps, bool tanh_gelu, double grn_eps) {
          BlockArgs a(x, ws, eps, tanh_gelu, grn_eps);
          return convnext_block_backward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("eps"), py::arg("tanh_gelu"),
        py::arg("grn_eps") = 1e-6);
  m.def(
      "convnext_block_backward",
      [](py::object gy, py::object x, py::sequence ws, double eps, bool tanh_gelu,
         py::sequence grads, py::object scratch, double grn_eps, uintptr_t stream,
         py::object grn_stats) {
        BlockArgs a(x, ws, eps, tanh_gelu, grn_eps);
        a.grads(grads);
        TensorView gyv = a.b.view(gy, "grad_y");
        TensorView sv;
        if (!grn_stats.is_none()) sv = a.b.view(grn_stats, "grn_stats");
        const size_t need = convnext_block_backward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        convnext_block_backward(gyv, a.x, a.w, a.p, a.g, sc.ptr, sc.bytes, as_stream(stream),
                                grn_stats.is_none() ? nullptr : &sv);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weights"), py::arg("eps"), py::arg("tanh_gelu"),
      py::arg("grads"), py::arg("scratch") = py::none(), py::arg("grn_eps") = 1e-6,
      py::arg("stream") = 0, py::arg("grn_stats") = py::none());
  // ------------------------------------------------------------ metanext_block (inference)
  // weights: (hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias, fc1_weight, fc1_bias,
  // fc2_weight, fc2_bias, gamma, drop_scale), None where absent.
  struct MetaNeXtArgs {
    Borrowed b;
    TensorView x, wv[12];
    MetaNeXtBlockWeights w;
    MetaNeXtBlockParams p;
    MetaNeXtArgs(const py::object& xo, const py::sequence& ws, int64_t dilation, bool tanh_gelu) {
      static const char* names[12] = {"hw_weight",  "hw_bias",  "w_weight",   "w_bias",
                                      "h_weight",   "h_bias",   "fc1_weight", "fc1_bias",
                                      "fc2_weight", "fc2_bias", "gamma",      "drop_scale"};
      FV_CHECK_VALUE(py::len(ws) == 12, "weights: expected 12 entries, got ", py::len(ws));
      x = b.view(xo, "x");
      const TensorView* ptr[12];
      optional_views(b, ws, 12, names, wv, ptr);
      w = MetaNeXtBlockWeights{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4],  ptr[5],
                               ptr[6], ptr[7], ptr[8], ptr[9], ptr[10], ptr[11]};
      p.dilation = dilation;
      p.gelu_tanh = tanh_gelu;
    }
  };
  m.def("metanext_block_forward_scratch_bytes",
        [](py::object x, py::sequence ws, int64_t dilation, bool tanh_gelu) {
          MetaNeXtArgs a(x, ws, dilation, tanh_gelu);
          return metanext_block_forward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("dilation"), py::arg("tanh_gelu"));
  m.def(
      "metanext_block_forward",
      [](py::object x, py::sequence ws, int64_t dilation, bool tanh_gelu, py::object y,
         py::object scratch) {
        MetaNeXtArgs a(x, ws, dilation, tanh_gelu);
        TensorView yv = a.b.view(y, "y");
        const size_t need = metanext_block_forward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        metanext_block_forward(a.x, a.w, a.p, yv, sc.ptr, sc.bytes);
      },
      py::arg("x"), py::arg("weights"), py::arg("dilation"), py::arg("tanh_gelu"), py::arg("y"),
      py::arg("scratch") = py::none());
  // A chain of MetaNeXt blocks, as convnext_block_forward_chain: blocks[i] = (weights,
  // dilation, tanh_gelu).
  m.def(
      "metanext_block_forward_chain",
      [](py::object x, py::sequence blocks, py::sequence ys) {
        run_chain<MetaNeXtArgs>(
            x, blocks, ys, 3, "(weights, dilation, tanh_gelu)",
            [](const py::object& xi, const py::sequence& blk) {
              return new MetaNeXtArgs(xi, blk[0], blk[1].cast<int64_t>(), blk[2].cast<bool>());
            },
            [](const MetaNeXtArgs& a) { return metanext_block_forward_scratch_bytes(a.x, a.w, a.p); },
            [](const MetaNeXtArgs& a, const TensorView& y, void* sp, size_t sb) {
              metanext_block_forward(a.x, a.w, a.p, y, sp, sb);
            });
      },
      py::arg("x"), py::arg("blocks"), py::arg("ys"));
  // ------------------------------------------------------------ mlp (tiled, no mixer)
  // weights: (fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias), None where
  // absent; grads: (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias),
  // None where not wanted.
  struct MlpArgs {
    Borrowed b;
    TensorView x, wv[6], gv[7];
    MlpWeights w;
    MlpGrads g;
    MlpParams p;
    MlpArgs(const py::object& xo, const py::sequence& ws, bool tanh_gelu, double grn_eps) {
      static const char* names[6] = {"fc1_weight", "fc1_bias", "fc2_weight",
                                     "fc2_bias",   "grn_weight", "grn_bias"};
      FV_CHECK_VALUE(py::len(ws) == 6, "weights: expected 6 entries, got ", py::len(ws));
      x = b.view(xo, "x");
      const TensorView* ptr[6];
      optional_views(b, ws, 6, names, wv, ptr);
      w = MlpWeights{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5]};
      p.gelu_tanh = tanh_gelu;
      p.grn_eps = grn_eps;
    }
    void grads(const py::sequence& gs) {
      static const char* names[7] = {"grad_x",          "grad_fc1_weight", "grad_fc1_bias",
                                     "grad_fc2_weight", "grad_fc2_bias",   "grad_grn_weight",
                                     "grad_grn_bias"};
      FV_CHECK_VALUE(py::len(gs) == 7, "grads: expected 7 entries, got ", py::len(gs));
      const TensorView* ptr[7];
      optional_views(b, gs, 7, names, gv, ptr);
      g = MlpGrads{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6]};
    }
  };
  m.def("mlp_forward_scratch_bytes",
        [](py::object x, py::sequence ws, bool tanh_gelu, double grn_eps) {
          MlpArgs a(x, ws, tanh_gelu, grn_eps);
          return mlp_forward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("tanh_gelu"), py::arg("grn_eps") = 1e-6);
  // grn_stats: None, or GRN's (N, H, hidden) row sums to write (forward) / read (backward).
  m.def(
      "mlp_forward",
      [](py::object x, py::sequence ws, bool tanh_gelu, double grn_eps, py::object y,
         py::object scratch, py::object grn_stats) {
        MlpArgs a(x, ws, tanh_gelu, grn_eps);
        TensorView yv = a.b.view(y, "y");
        TensorView sv;
        if (!grn_stats.is_none()) sv = a.b.view(grn_stats, "grn_stats");
        const size_t need = mlp_forward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        mlp_forward(a.x, a.w, a.p, yv, sc.ptr, sc.bytes, grn_stats.is_none() ? nullptr : &sv);
      },
      py::arg("x"), py::arg("weights"), py::arg("tanh_gelu"), py::arg("grn_eps"), py::arg("y"),
      py::arg("scratch") = py::none(), py::arg("grn_stats") = py::none());
  m.def("mlp_backward_scratch_bytes",
        [](py::object x, py::sequence ws, bool tanh_gelu, double grn_eps) {
          MlpArgs a(x, ws, tanh_gelu, grn_eps);
          return mlp_backward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("tanh_gelu"), py::arg("grn_eps") = 1e-6);
  m.def(
      "mlp_backward",
      [](py::object gy, py::object x, py::sequence ws, bool tanh_gelu, double grn_eps,
         py::sequence grads, py::object scratch, py::object grn_stats) {
        MlpArgs a(x, ws, tanh_gelu, grn_eps);
        a.grads(grads);
        TensorView gyv = a.b.view(gy, "grad_y");
        TensorView sv;
        if (!grn_stats.is_none()) sv = a.b.view(grn_stats, "grn_stats");
        const size_t need = mlp_backward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        mlp_backward(gyv, a.x, a.w, a.p, a.g, sc.ptr, sc.bytes,
                     grn_stats.is_none() ? nullptr : &sv);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weights"), py::arg("tanh_gelu"),
      py::arg("grn_eps"), py::arg("grads"), py::arg("scratch") = py::none(),
      py::arg("grn_stats") = py::none());
  // ------------------------------------------------------------ global_response_norm
  // weight and bias are required; norm is (N, C) in the statistics dtype; activation is
  // GrnActivation's value (0 none, 1 exact GELU, 2 tanh GELU) applied to x first.
  auto grn_activation = [](int a) {
    if (a < 0 || a > 2)
      throw py::value_error("activation: expected 0 (none), 1 (gelu) or 2 (gelu tanh), got " +
                            std::to_string(a));
    return static_cast<GrnActivation>(a);
  };
  m.def("global_response_norm_forward_scratch_bytes",
        [](py::object x) {
          Borrowed b;
          return global_response_norm_forward_scratch_bytes(b.view(x, "x"));
        },
        py::arg("x"));

  m.def(
      "global_response_norm_forward",
      [opt_view, grn_activation](py::object x, py::object w, py::object bias, double eps,
                                 py::object y, py::object norm, py::object scratch,
                                 int activation) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), bv = b.view(bias, "bias"),
                   yv = b.view(y, "y"), nv;
        const TensorView* np = opt_view(b, norm, nv, "norm");
        const GrnActivation act = grn_activation(activation);
        global_response_norm_shape(xv, wv, &bv, eps);
        const size_t need = global_response_norm_forward_scratch_bytes(xv);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        global_response_norm_forward(xv, wv, bv, eps, yv, np, sc.ptr, sc.bytes, act);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"),
      py::arg("norm") = py::none(), py::arg("scratch") = py::none(), py::arg("activation") = 0);

  m.def(
      "global_response_norm_apply",
      [grn_activation](py::object x, py::object w, py::object bias, double eps, py::object norm,
                       py::object y, py::object scratch, int activation) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), bv = b.view(bias, "bias"),
                   nv = b.view(norm, "norm"), yv = b.view(y, "y");
        const GrnActivation act = grn_activation(activation);
        global_response_norm_shape(xv, wv, &bv, eps);
        const size_t need = global_response_norm_forward_scratch_bytes(xv);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        global_response_norm_apply(xv, wv, bv, eps, nv, yv, sc.ptr, sc.bytes, act);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("norm"),
      py::arg("y"), py::arg("scratch") = py::none(), py::arg("activation") = 0);

  m.def("global_response_norm_backward_scratch_bytes",
        [](py::object x) {
          Borrowed b;
          return global_response_norm_backward_scratch_bytes(b.view(x, "x"));
        },
        py::arg("x"));

  m.def(
      "global_response_norm_backward",
      [opt_view, grn_activation](py::object gy, py::object x, py::object w, py::object norm,
                                 double eps, py::object gx, py::object gw, py::object gb,
                                 py::object scratch, int activation, py::object bias,
                                 py::object y) {
        Borrowed b;
        TensorView gyv = b.view(gy, "grad_y"), xv = b.view(x, "x"), wv = b.view(w, "weight"),
                   nv = b.view(norm, "norm"), gxv, gwv, gbv, bv, yv;
        const GrnActivation act = grn_activation(activation);
        const TensorView* gxp = opt_view(b, gx, gxv, "grad_x");
        const TensorView* gwp = opt_view(b, gw, gwv, "grad_weight");
        const TensorView* gbp = opt_view(b, gb, gbv, "grad_bias");
        const TensorView* bp = opt_view(b, bias, bv, "bias");
        const TensorView* yp = opt_view(b, y, yv, "y");
        global_response_norm_shape(xv, wv, bp, eps);
        const size_t need = global_response_norm_backward_scratch_bytes(xv);
        Scratch sc(b, scratch, need, xv);
        py::gil_scoped_release nogil;
        global_response_norm_backward(gyv, xv, wv, nv, eps, gxp, gwp, gbp, sc.ptr, sc.bytes, act,
                                      bp, yp);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("norm"), py::arg("eps"),
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
      py::arg("scratch") = py::none(), py::arg("activation") = 0, py::arg("bias") = py::none(),
      py::arg("y") = py::none());

  m.def(
      "global_response_norm_forward_reference",
      [opt_view](py::object x, py::object w, py::object bias, double eps, py::object y,
                 py::object norm) {
        Borrowed b;
        TensorView xv = b.view(x, "x"), wv = b.view(w, "weight"), bv = b.view(bias, "bias"),
                   yv = b.view(y, "y"), nv;
        const TensorView* np = opt_view(b, norm, nv, "norm");
        py::gil_scoped_release nogil;
        global_response_norm_forward_reference(xv, wv, bv, eps, yv, np);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"),
      py::arg("norm") = py::none());

  m.def(
      "global_response_norm_backward_reference",
      [opt_view](py::object gy, py::object x, py::object w, double eps, py::object gx,
                 py::object gw, py::object gb) {
        Borrowed b;
        TensorView gyv = b.view(gy, "grad_y"), xv = b.view(x, "x"), wv = b.view(w, "weight"),
                   gxv, gwv, gbv;
        const TensorView* gxp = opt_view(b, gx, gxv, "grad_x");
        const TensorView* gwp = opt_view(b, gw, gwv, "grad_weight");
        const TensorView* gbp = opt_view(b, gb, gbv, "grad_bias");
        py::gil_scoped_release nogil;
        global_response_norm_backward_reference(gyv, xv, wv, eps, gxp, gwp, gbp);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("grad_x"),
      py::arg("grad_weight"), py::arg("grad_bias"));

  // ------------------------------------------------------------ dilated_reparam
  // Branches as parallel sequences: weights, dilations (ints), bn_weights, bn_biases;
  // mean / var are (B, C) in the statistics dtype; gradient sequences may be None.
  struct DilrepArgs {
    Borrowed b;
    TensorView x;
    std::vector<TensorView> w, gamma, beta, gw, gg, gb;
    std::vector<int64_t> dil;
    DilatedReparamBranches br;
    DilrepArgs(const py::object& xo, const py::sequence& ws, const std::vector<int64_t>& ds,
               const py::sequence& gs, const py::sequence& bs) {
      x = b.view(xo, "x");
      const size_t n = py::len(ws);
      FV_CHECK_VALUE(ds.size() == n && py::len(gs) == n && py::len(bs) == n,
                     "dilated_reparam: weights, dilations, bn_weights and bn_biases must have one "
                     "entry per branch; got ", n, ", ", ds.size(), ", ", py::len(gs), ", ",
                     py::len(bs));
      for (size_t i = 0; i < n; ++i) {
        w.push_back(b.view(ws[i], "weights"));
        gamma.push_back(b.view(gs[i], "bn_weights"));
        beta.push_back(b.view(bs[i], "bn_biases"));
      }
      dil = ds;
      br.count = static_cast<int64_t>(n);
      br.weight = w.data();
      br.dilation = dil.data();
      br.bn_weight = gamma.data();
      br.bn_bias = beta.data();
    }
    const TensorView* grads(const py::object& seq, std::vector<TensorView>& out,
                            const char* name) {
      if (seq.is_none()) return nullptr;
      py::sequence s = seq;
      FV_CHECK_VALUE(static_cast<int64_t>(py::len(s)) == br.count, name, ": expected ", br.count,
                     " entries, got ", py::len(s));
      for (size_t i = 0; i < py::len(s); ++i) out.push_back(b.view(s[i], name));
      return out.data();
    }
  };

  m.def("dilated_reparam_forward_scratch_bytes",
        [](py::object x, py::sequence ws, std::vector<int64_t> ds, py::sequence gs,
           py::sequence bs) {
          DilrepArgs a(x, ws, ds, gs, bs);
          return dilated_reparam_forward_scratch_bytes(a.x, a.br);
        },
        py::arg("x"), py::arg("weights"), py::arg("dilations"), py::arg("bn_weights"),
        py::arg("bn_biases"));
  m.def(
      "dilated_reparam_forward",
      [](py::object x, py::sequence ws, std::vector<int64_t> ds, py::sequence gs, py::sequence bs,
         double eps, py::object y, py::object mean, py::object var, py::object scratch) {
        DilrepArgs a(x, ws, ds, gs, bs);
        TensorView yv = a.b.view(y, "y"), mv = a.b.view(mean, "mean"), vv = a.b.view(var, "var");
        const size_t need = dilated_reparam_forward_scratch_bytes(a.x, a.br);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        dilated_reparam_forward(a.x, a.br, eps, yv, mv, vv, sc.ptr, sc.bytes);
      },
      py::arg("x"), py::arg("weights"), py::arg("dilations"), py::arg("bn_weights"),
      py::arg("bn_biases"), py::arg("eps"), py::arg("y"), py::arg("mean"), py::arg("var"),
      py::arg("scratch") = py::none());
  m.def("dilated_reparam_backward_scratch_bytes",
        [](py::object x, py::sequence ws, std::vector<int64_t> ds, py::sequence gs,
           py::sequence bs) {
          DilrepArgs a(x, ws, ds, gs, bs);
          return dilated_reparam_backward_scratch_bytes(a.x, a.br);
        },
        py::arg("x"), py::arg("weights"), py::arg("dilations"), py::arg("bn_weights"),
        py::arg("bn_biases"));
  m.def(
      "dilated_reparam_backward",
      [opt_view](py::object gy, py::object x, py::sequence ws, std::vector<int64_t> ds,
                 py::sequence gs, py::sequence bs, py::object mean, py::object var, double eps,
                 py::object gx, py::object gws, py::object ggs, py::object gbs,
                 py::object scratch) {
        DilrepArgs a(x, ws, ds, gs, bs);
        TensorView gyv = a.b.view(gy, "grad_y"), mv = a.b.view(mean, "mean"),
                   vv = a.b.view(var, "var"), gxv;
        const TensorView* gxp = opt_view(a.b, gx, gxv, "grad_x");
        const TensorView* gwp = a.grads(gws, a.gw, "grad_weights");
        const TensorView* ggp = a.grads(ggs, a.gg, "grad_bn_weights");
        const TensorView* gbp = a.grads(gbs, a.gb, "grad_bn_biases");
        const size_t need = dilated_reparam_backward_scratch_bytes(a.x, a.br);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        dilated_reparam_backward(gyv, a.x, a.br, mv, vv, eps, gxp, gwp, ggp, gbp, sc.ptr,
                                 sc.bytes);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weights"), py::arg("dilations"),
      py::arg("bn_weights"), py::arg("bn_biases"), py::arg("mean"), py::arg("var"),
      py::arg("eps"), py::arg("grad_x"), py::arg("grad_weights"), py::arg("grad_bn_weights"),
      py::arg("grad_bn_biases"), py::arg("scratch") = py::none());

  // ------------------------------------------------------------ inception_dwconv
  // weights: (hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias), biases None when
  // absent; grads: (x, hw_weight, hw_bias, w_weight, w_bias, h_weight, h_bias), None where
  // not wanted.
  struct IncArgs {
    Borrowed b;
    TensorView x, wv[6], gv[7];
    InceptionDWConv2dWeights w;
    InceptionDWConv2dGrads g;
    InceptionDWConv2dParams p;
    IncArgs(const py::object& xo, const py::sequence& ws, int64_t dilation) {
      static const char* names[6] = {"hw_weight", "hw_bias", "w_weight", "w_bias", "h_weight",
                                     "h_bias"};
      FV_CHECK_VALUE(py::len(ws) == 6, "weights: expected 6 entries, got ", py::len(ws));
      x = b.view(xo, "x");
      const TensorView* ptr[6];
      optional_views(b, ws, 6, names, wv, ptr);
      w = InceptionDWConv2dWeights{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5]};
      p.dilation = dilation;
    }
    void grads(const py::sequence& gs) {
      static const char* names[7] = {"grad_x", "grad_hw_weight", "grad_hw_bias", "grad_w_weight",
                                     "grad_w_bias", "grad_h_weight", "grad_h_bias"};
      FV_CHECK_VALUE(py::len(gs) == 7, "grads: expected 7 entries, got ", py::len(gs));
      const TensorView* ptr[7];
      optional_views(b, gs, 7, names, gv, ptr);
      g = InceptionDWConv2dGrads{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6]};
    }
  };

  m.def("inception_dwconv_output_shape",
        [](py::object x, py::sequence ws, int64_t dilation) {
          IncArgs a(x, ws, dilation);
          const auto s = inception_dwconv2d_shape(a.x, a.w, a.p);
          return py::make_tuple(s.n, s.c, s.h, s.w, s.g);
        },
        py::arg("x"), py::arg("weights"), py::arg("dilation"));
  m.def("inception_dwconv_forward_scratch_bytes",
        [](py::object x, py::sequence ws, int64_t dilation) {
          IncArgs a(x, ws, dilation);
          return inception_dwconv2d_forward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("dilation"));
  m.def(
      "inception_dwconv_forward",
      [](py::object x, py::sequence ws, int64_t dilation, py::object y, py::object scratch,
         uintptr_t stream) {
        IncArgs a(x, ws, dilation);
        TensorView yv = a.b.view(y, "y");
        const size_t need = inception_dwconv2d_forward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        inception_dwconv2d_forward(a.x, a.w, a.p, yv, sc.ptr, sc.bytes, as_stream(stream));
      },
      py::arg("x"), py::arg("weights"), py::arg("dilation"), py::arg("y"),
      py::arg("scratch") = py::none(), py::arg("stream") = 0);
  m.def("inception_dwconv_backward_scratch_bytes",
        [](py::object x, py::sequence ws, int64_t dilation) {
          IncArgs a(x, ws, dilation);
          return inception_dwconv2d_backward_scratch_bytes(a.x, a.w, a.p);
        },
        py::arg("x"), py::arg("weights"), py::arg("dilation"));
  m.def(
      "inception_dwconv_backward",
      [](py::object gy, py::object x, py::sequence ws, int64_t dilation, py::sequence grads,
         py::object scratch, uintptr_t stream) {
        IncArgs a(x, ws, dilation);
        a.grads(grads);
        TensorView gyv = a.b.view(gy, "grad_y");
        const size_t need = inception_dwconv2d_backward_scratch_bytes(a.x, a.w, a.p);
        Scratch sc(a.b, scratch, need, a.x);
        py::gil_scoped_release nogil;
        inception_dwconv2d_backward(gyv, a.x, a.w, a.p, a.g, sc.ptr, sc.bytes, as_stream(stream));
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weights"), py::arg("dilation"), py::arg("grads"),
      py::arg("scratch") = py::none(), py::arg("stream") = 0);
}
