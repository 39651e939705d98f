// Operator declarations of the genrep_fast library and the Python module entry point.
//
// Every op is declared once here with TORCH_LIBRARY; each device implements it in its own file with
// TORCH_LIBRARY_IMPL(genrep_fast, CPU|CUDA, m). Python adds fake (meta) implementations in
// genrep_fast/_ops.py so the ops trace under torch.compile.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import genrep_fast._C` runs the static TORCH_LIBRARY initialisers of this shared object. The
// module itself is empty: the ops are reached through torch.ops.genrep_fast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "genrep_fast compiled ops (see torch.ops.genrep_fast)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(genrep_fast, m) {
  // Gradient alignment (docs/METHOD.md section 3). group_ids[i] is the group of tensor i (or -1: in no
  // group). Returns [num_groups, 3] = (<p,g>, |p|^2, |g|^2) per group in float64 whatever the
  // inputs' dtype (float32 squares underflow below ~1e-19 and overflow above ~1.8e19, which would
  // turn tiny gradients into "zero" ones), reduced in a fixed order so that repeated calls are
  // bitwise identical.
  // A None entry of p or g is a missing gradient and counts as zeros (no zeros tensor is made).
  m.def("group_sums(Tensor?[] p, Tensor?[] g, int[] group_ids, int num_groups) -> Tensor");
  // out[i] = a[grp] * p[i] + b[grp] * g[i] with grp = group_ids[i] and (a, b) computed from
  // sums ([G, 3] float64, as group_sums returns it) on the device: no host sync, so a CUDA graph
  // can capture it. Group -1 gets (w_p, w_g); a group with non-finite sums gets nan. out[i] may be
  // p[i] or g[i] (in-place update of .grad); both None writes zeros. mode is one of symmetric,
  // generation, perception, none (reference.alignment_coefficients). (Not named
  // "mode": auto_functionalize passes a keyword of that name.)
  m.def(
      "align_combine(Tensor?[] p, Tensor?[] g, Tensor sums, int[] group_ids, float k, float w_p, "
      "float w_g, str align_mode, Tensor(a!)[] out) -> ()");

  // GradientAligner's per-step bookkeeping in one pass over both gradient lists (metadata only):
  // a code of every entry's presence, shape, dtype, device and layout (the key of its cached
  // plan), and per position where the update may be written in place: 0 p[i], 1 g[i], -1 a fresh
  // buffer (the storage is shared, partial or not contiguous), -2 nowhere (both missing).
  m.def("grad_layout(Tensor?[] p, Tensor?[] g) -> (str, int[])");

  // Mixture log-likelihood (docs/METHOD.md section 1), exact difference form, for the memory-bound
  // layouts: x [B, D]; mu a per-image bank [B, C, T, D] or a shared bank [C, T, D]; sigma
  // isotropic as [Bs, Cs, T] (Bs in {1, B}, Cs in {1, C}) in the accumulation dtype (float32, or
  // float64 for float64 inputs), or diagonal (mu's shape, mu's dtype or the accumulation dtype);
  // class_index [B, K] int64 candidate classes (None: all C). Returns log p(x|y) [B, K] in the
  // accumulation dtype. CPU only (csrc/mixture_cpu.cpp).
  m.def("mixture_ll_diff(Tensor x, Tensor mu, Tensor sigma, Tensor? class_index) -> Tensor");
  // Its backward for grad = dL/dll [B, K]: (grad_x like x, grad_mu like mu, grad_sigma like
  // sigma); the weights are recomputed (nothing of size [B, K, T] is saved). A gradient not asked
  // for comes back empty.
  m.def(
      "mixture_ll_diff_backward(Tensor grad, Tensor x, Tensor mu, Tensor sigma, "
      "Tensor? class_index, bool need_x, bool need_mu, bool need_sigma) -> (Tensor, Tensor, "
      "Tensor)");
}
