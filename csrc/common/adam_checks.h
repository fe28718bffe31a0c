// Validation of fastopt::adam_step_'s arguments, shared by the CPU and CUDA kernels: every
// problem is a RuntimeError that names the list, the index and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace fastopt {

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
      max_exp_avg_sq_scales, master_params, state_steps;
  int64_t block_size;
};

inline void check_list_length(at::TensorList list, size_t n, const char* name, bool may_be_empty) {
  TORCH_CHECK(list.size() == n || (may_be_empty && list.empty()), "fastopt::adam_step_: ", name, " has ",
              list.size(), " tensors, expected ", n, may_be_empty ? " or 0" : "");
}

// Params fp32/bf16/fp16 and state fp32/bf16/fp8 of one dtype each, all contiguous, on `device`,
// moments shaped like their params, fp8 scales of length ceil(numel / block_size), block_size a
// power of two in [32, max_block]. Optional scalars (lr, grad_scale, found_inf): one fp32 element;
// on `device` when scalars_on_device (CUDA reads them in-kernel; the CPU kernel reads any device).
inline void check_adam_args(const AdamArgs& a, const at::Device& device, int64_t max_block,
                            std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> scalars,
                            bool scalars_on_device) {
  const size_t n = a.params.size();
  check_list_length(a.grads, n, "grads", false);
  check_list_length(a.exp_avgs, n, "exp_avgs", false);
  check_list_length(a.exp_avg_sqs, n, "exp_avg_sqs", false);
  check_list_length(a.state_steps, n, "state_steps", false);
  check_list_length(a.max_exp_avg_sqs, n, "max_exp_avg_sqs", true);
  check_list_length(a.master_params, n, "master_params", true);
  if (n == 0) return;
  const auto param_dtype = a.params[0].scalar_type(), state_dtype = a.exp_avgs[0].scalar_type();
  const bool fp8 = state_dtype == at::kFloat8_e4m3fn, amsgrad = !a.max_exp_avg_sqs.empty();
  TORCH_CHECK(param_dtype == at::kFloat || param_dtype == at::kBFloat16 || param_dtype == at::kHalf,
              "fastopt::adam_step_: params must be float32, bfloat16 or float16, got ", param_dtype);
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16 || fp8,
              "fastopt::adam_step_: state must be float32, bfloat16 or float8_e4m3fn, got ", state_dtype);
  if (fp8) {
    TORCH_CHECK(a.block_size >= 32 && a.block_size <= max_block && (a.block_size & (a.block_size - 1)) == 0,
                "fastopt::adam_step_: block_size must be a power of two in [32, ", max_block, "], got ", a.block_size);
    check_list_length(a.exp_avg_scales, n, "exp_avg_scales", false);
    check_list_length(a.exp_avg_sq_scales, n, "exp_avg_sq_scales", false);
    check_list_length(a.max_exp_avg_sq_scales, amsgrad ? n : 0, "max_exp_avg_sq_scales", false);
  } else {
    TORCH_CHECK(a.exp_avg_scales.empty() && a.exp_avg_sq_scales.empty() && a.max_exp_avg_sq_scales.empty(),
                "fastopt::adam_step_: scale lists must be empty unless the state is float8_e4m3fn");
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = a.params[i].numel();
    auto check = [&](const at::Tensor& t, at::ScalarType dtype, int64_t expected_numel, const char* name) {
      TORCH_CHECK(t.device() == device && t.is_contiguous() && t.scalar_type() == dtype &&
                      t.numel() == expected_numel,
                  "fastopt::adam_step_: ", name, "[", i, "] must be a contiguous ", device, " ", dtype,
                  " tensor of ", expected_numel, " elements, got ", t.device(), " ", t.scalar_type(), " ",
                  t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
    };
    auto check_like_param = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
      check(t, dtype, numel, name);
      TORCH_CHECK(t.sizes() == a.params[i].sizes(), "fastopt::adam_step_: ", name, "[", i, "] has shape ",
                  t.sizes(), ", params[", i, "] ", a.params[i].sizes());
    };
    check(a.params[i], param_dtype, numel, "params");
    check_like_param(a.grads[i], param_dtype, "grads");
    check_like_param(a.exp_avgs[i], state_dtype, "exp_avgs");
    check_like_param(a.exp_avg_sqs[i], state_dtype, "exp_avg_sqs");
    if (amsgrad) check_like_param(a.max_exp_avg_sqs[i], state_dtype, "max_exp_avg_sqs");
    if (!a.master_params.empty()) check_like_param(a.master_params[i], at::kFloat, "master_params");
    check(a.state_steps[i], at::kFloat, 1, "state_steps");
    if (fp8) {
      const int64_t blocks = (numel + a.block_size - 1) / a.block_size;
      check(a.exp_avg_scales[i], at::kFloat, blocks, "exp_avg_scales");
      check(a.exp_avg_sq_scales[i], at::kFloat, blocks, "exp_avg_sq_scales");
      if (amsgrad) check(a.max_exp_avg_sq_scales[i], at::kFloat, blocks, "max_exp_avg_sq_scales");
    }
  }
  for (const auto& [name, scalar] : scalars) {
    if (!scalar->has_value()) continue;
    const at::Tensor& t = **scalar;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && (!scalars_on_device || t.device() == device),
                "fastopt::adam_step_: ", name, " must be a one-element float32 tensor",
                scalars_on_device ? " on the params' device" : "", ", got ", t.scalar_type(), " ", t.sizes(), " on ",
                t.device());
  }
}

}  // namespace fastopt
