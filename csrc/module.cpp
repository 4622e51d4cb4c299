// dino_fast._C: the C++ CPU kernels (csrc/*.cpp) bound with pybind11 over buffer views, without
// torch headers. dino_fast/ops/_cpp.py passes zero-copy numpy views of torch tensors (bfloat16 as
// its uint16 bit pattern) and preallocated outputs; this file checks them and releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace dino_fast {
double dino_loss_fwd(const void* student, bool student_bf16, const void* teacher,
                     bool teacher_bf16, const float* center, int64_t batch, int64_t k,
                     int64_t ncrops, float student_temp, float teacher_temp, void* grad,
                     float* teacher_mean, float* teacher_entropy, float* probs_mean,
                     int threads);
void ema_(float* teacher, const float* student, int64_t n, float momentum, int threads);
void clip_gradients_(const std::vector<float*>& grads, const std::vector<int64_t>& numels,
                     const float* norms, float clip, int threads);
}  // namespace dino_fast

namespace {

// A checked C-contiguous buffer of float32 ("f") or bfloat16 bits ("H", as uint16).
struct Buffer {
  py::buffer_info info;
  bool bf16;

  Buffer(const py::buffer& buffer, const char* name, bool writable, bool allow_bf16)
      : info(buffer.request(writable)) {
    const bool f32 = info.format == py::format_descriptor<float>::format();
    bf16 = allow_bf16 && info.format == py::format_descriptor<uint16_t>::format();
    if (!f32 && !bf16)
      throw std::invalid_argument(std::string(name) + ": expected a float32" +
                                  (allow_bf16 ? " or bfloat16 (as uint16)" : "") +
                                  " buffer, got format '" + info.format + "'");
    py::ssize_t expected = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[d] > 1 && info.strides[d] != expected)
        throw std::invalid_argument(std::string(name) + ": the buffer must be C-contiguous");
      expected *= info.shape[d];
    }
  }

  void require_size(const char* name, int64_t numel) const {
    if (info.size != numel)
      throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(numel) +
                                  " elements, got " + std::to_string(info.size));
  }
};

int64_t checked_positive(const char* name, int64_t value) {
  if (value < 0) throw std::invalid_argument(std::string(name) + " must be >= 0");
  return value;
}

double dino_loss_fwd(const py::buffer& student, const py::buffer& teacher,
                     const py::buffer& center, const py::object& grad,
                     const py::buffer& teacher_mean, int64_t batch, int64_t k, int64_t ncrops,
                     double student_temp, double teacher_temp, int threads,
                     const py::object& teacher_entropy, const py::object& probs_mean) {
  checked_positive("batch", batch);
  checked_positive("k", k);
  if (ncrops < 2) throw std::invalid_argument("ncrops must be >= 2");
  Buffer s(student, "student", false, true), t(teacher, "teacher", false, true);
  Buffer c(center, "center", false, false), mean(teacher_mean, "teacher_mean", true, false);
  s.require_size("student", ncrops * batch * k);
  t.require_size("teacher", 2 * batch * k);
  c.require_size("center", k);
  mean.require_size("teacher_mean", k);
  void* grad_ptr = nullptr;
  if (!grad.is_none()) {
    Buffer g(grad.cast<py::buffer>(), "grad", true, true);
    g.require_size("grad", ncrops * batch * k);
    if (g.bf16 != s.bf16) throw std::invalid_argument("grad must have the student's dtype");
    grad_ptr = g.info.ptr;  // the numpy array behind `grad` keeps the memory alive
  }
  float* entropy_ptr = nullptr;
  float* probs_mean_ptr = nullptr;
  if (!teacher_entropy.is_none()) {
    Buffer e(teacher_entropy.cast<py::buffer>(), "teacher_entropy", true, false);
    e.require_size("teacher_entropy", 2 * batch);
    entropy_ptr = static_cast<float*>(e.info.ptr);
  }
  if (!probs_mean.is_none()) {
    Buffer p(probs_mean.cast<py::buffer>(), "probs_mean", true, false);
    p.require_size("probs_mean", k);
    probs_mean_ptr = static_cast<float*>(p.info.ptr);
  }
  py::gil_scoped_release release;
  return dino_fast::dino_loss_fwd(s.info.ptr, s.bf16, t.info.ptr, t.bf16,
                                  static_cast<const float*>(c.info.ptr), batch, k, ncrops,
                                  static_cast<float>(student_temp),
                                  static_cast<float>(teacher_temp), grad_ptr,
                                  static_cast<float*>(mean.info.ptr), entropy_ptr,
                                  probs_mean_ptr, threads < 1 ? 1 : threads);
}

void ema_(const py::buffer& teacher, const py::buffer& student, double momentum, int threads) {
  Buffer t(teacher, "teacher", true, false), s(student, "student", false, false);
  s.require_size("student", t.info.size);
  py::gil_scoped_release release;
  dino_fast::ema_(static_cast<float*>(t.info.ptr), static_cast<const float*>(s.info.ptr),
                  t.info.size, static_cast<float>(momentum), threads < 1 ? 1 : threads);
}

void clip_gradients_(const std::vector<py::buffer>& grads, const py::buffer& norms, double clip,
                     int threads) {
  Buffer n(norms, "norms", false, false);
  n.require_size("norms", static_cast<int64_t>(grads.size()));
  std::vector<float*> pointers;
  std::vector<int64_t> numels;
  for (const auto& grad : grads) {
    Buffer g(grad, "grads", true, false);  // the numpy arrays in `grads` keep the memory alive
    pointers.push_back(static_cast<float*>(g.info.ptr));
    numels.push_back(g.info.size);
  }
  py::gil_scoped_release release;
  dino_fast::clip_gradients_(pointers, numels, static_cast<const float*>(n.info.ptr),
                             static_cast<float>(clip), threads < 1 ? 1 : threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dino_fast C++ CPU kernels: the fused DINO loss, the teacher EMA and the "
            "per-parameter gradient clipping.";
  m.def("dino_loss_fwd", &dino_loss_fwd, py::arg("student"), py::arg("teacher"),
        py::arg("center"), py::arg("grad"), py::arg("teacher_mean"), py::arg("batch"),
        py::arg("k"), py::arg("ncrops"), py::arg("student_temp"), py::arg("teacher_temp"),
        py::arg("threads"), py::arg("teacher_entropy") = py::none(),
        py::arg("probs_mean") = py::none(),
        "Fused DINO loss on row-major [ncrops*B, K] student and [2B, K] teacher logits: returns "
        "the loss, writes the teacher row mean and (unless grad is None) d loss / d student; "
        "given float32 buffers, also each teacher row's entropy [2B] and the mean teacher "
        "probabilities [K] (health metrics).");
  m.def("ema_", &ema_, py::arg("teacher"), py::arg("student"), py::arg("momentum"),
        py::arg("threads"),
        "teacher = momentum * teacher + (1 - momentum) * student, in place (flat float32).");
  m.def("clip_gradients_", &clip_gradients_, py::arg("grads"), py::arg("norms"), py::arg("clip"),
        py::arg("threads"),
        "grads[i] *= min(clip / (norms[i] + 1e-6), 1), in place, over a list of float32 "
        "gradients (one norm each).");
}
