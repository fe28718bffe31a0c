// The op schemas of fastopt. Kernels register per device in cpu/ and cuda/;
// fake (meta) implementations are registered from Python (fastopt/ops).
#include <torch/library.h>

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] exp_avg_scales, "
      "Tensor(f!)[] exp_avg_sq_scales, Tensor(g!)[] max_exp_avg_sq_scales, "
      "Tensor(h!)[] master_params, Tensor[] state_steps, Tensor? lr_tensor, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool nesterov, bool maximize, "
      "bool cautious, int block_size, int sr_seed, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "lion_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_scales, "
      "Tensor(d!)[] master_params, Tensor? lr_tensor, float lr, float beta1, float beta2, float weight_decay, "
      "bool maximize, bool cautious, int block_size, int sr_seed, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "mars_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] last_grads, Tensor(f!)[] exp_avg_scales, "
      "Tensor(g!)[] exp_avg_sq_scales, Tensor(h!)[] max_exp_avg_sq_scales, Tensor(i!)[] last_grad_scales, "
      "Tensor(j!)[] master_params, Tensor[] state_steps, Tensor? lr_tensor, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float gamma, bool maximize, bool cautious, int block_size, int sr_seed, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "sophia_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, "
      "Tensor(c!)[] exp_avg_scales, Tensor[] hessian_scales, Tensor(d!)[] master_params, Tensor? lr_tensor, "
      "float lr, float beta1, float rho, float bs, float weight_decay, bool maximize, int block_size, int sr_seed, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "adam_mini_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_scales, "
      "Tensor[] step_sizes, int[] segment_lengths, Tensor(d!)[] master_params, Tensor? lr_tensor, float lr, "
      "float beta1, float weight_decay, bool maximize, int block_size, int sr_seed, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  // CPU only: step counters advanced in one call (cpu/elementwise_step.cpp); the lower triangle of a symmetric
  // product from its upper one (cpu/symmetric_mirror.cpp); the orthogonalized optimizers' momentum pass and
  // parameter update (cpu/matrix_elementwise.cpp); Kron's noise (cpu/philox_normal.cpp)
  m.def("advance_steps_(Tensor(a!)[] steps, float by) -> ()");
  m.def("mirror_upper_(Tensor(a!) x) -> ()");
  m.def(
      "momentum_direction_(Tensor(a!) buf, Tensor(b!)? buf_scale, int block_size, Tensor grad, Tensor(c!) direction, "
      "Tensor(d!) sumsq, float beta, float gamma, float delta, float epsilon) -> ()");
  m.def("decayed_update_(Tensor(a!) param, Tensor update, float decay, float step) -> ()");
  m.def("philox_normal_(Tensor(a!) out, int seed, int counter) -> ()");
  // CUDA only (csrc/cuda): the matrix ops of Newton-Schulz, SOAP/Kron and ROOT
  m.def("symmetric_product_(Tensor(a!) out, Tensor a, float alpha, float beta, bool transpose) -> ()");
  m.def(
      "quantile_clamp_(Tensor x, Tensor(a!) out, Tensor(b!) threshold, Tensor(c!)? norm, int k_lo, int k_hi, "
      "float weight, float offset) -> ()");
}
