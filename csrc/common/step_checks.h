// Validation of the arguments of the element-wise step ops (adam_step_, lion_step_, mars_step_,
// sophia_step_, adam_mini_step_), shared by the CPU and CUDA kernels: every problem is a RuntimeError that names the op, the list, the
// index and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastopt {

// One moment of a rule: its tensors and (fp8 only) their per-block scales. An optional moment
// (amsgrad's max_exp_avg_sqs) may be given for all tensors or for none.
struct StateArg {
  const char* name;
  at::TensorList states;
  const char* scale_name;
  at::TensorList scales;
  bool optional;
};

struct StepArgs {
  const char* op;
  at::TensorList params, grads, master_params, state_steps;
  bool has_steps;                 // the rule reads per-tensor step counts
  std::vector<StateArg> moments;  // the first one is required and sets the state dtype
  int64_t block_size;
};

inline void check_list_length(const char* op, at::TensorList list, size_t n, const char* name, bool may_be_empty) {
  TORCH_CHECK(list.size() == n || (may_be_empty && list.empty()), op, ": ", name, " has ", list.size(),
              " tensors, expected ", n, may_be_empty ? " or 0" : "");
}

// Params fp32/bf16/fp16 and state fp32/bf16/fp8 of one dtype each, all contiguous, on `device`,
// moments shaped like their params, fp8 scales of length ceil(numel / block_size), block_size a
// power of two in [32, max_block]. Optional scalars (lr, grad_scale, found_inf): one fp32 element;
// on `device` when scalars_on_device (CUDA reads them in-kernel; the CPU kernel reads any device).
inline void check_step_args(const StepArgs& a, const at::Device& device, int64_t max_block,
                            std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> scalars,
                            bool scalars_on_device) {
  const char* op = a.op;
  const size_t n = a.params.size();
  check_list_length(op, a.grads, n, "grads", false);
  if (a.has_steps) check_list_length(op, a.state_steps, n, "state_steps", false);
  check_list_length(op, a.master_params, n, "master_params", true);
  for (const StateArg& s : a.moments) check_list_length(op, s.states, n, s.name, s.optional);
  if (n == 0) return;
  const auto param_dtype = a.params[0].scalar_type(), state_dtype = a.moments[0].states[0].scalar_type();
  const bool fp8 = state_dtype == at::kFloat8_e4m3fn;
  TORCH_CHECK(param_dtype == at::kFloat || param_dtype == at::kBFloat16 || param_dtype == at::kHalf, op,
              ": params must be float32, bfloat16 or float16, got ", param_dtype);
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16 || fp8, op,
              ": state must be float32, bfloat16 or float8_e4m3fn, got ", state_dtype);
  if (fp8) {
    TORCH_CHECK(a.block_size >= 32 && a.block_size <= max_block && (a.block_size & (a.block_size - 1)) == 0, op,
                ": block_size must be a power of two in [32, ", max_block, "], got ", a.block_size);
  }
  for (const StateArg& s : a.moments) {
    check_list_length(op, s.scales, fp8 ? s.states.size() : 0, s.scale_name, false);
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = a.params[i].numel();
    auto check = [&](const at::Tensor& t, at::ScalarType dtype, int64_t expected_numel, const char* name) {
      TORCH_CHECK(t.device() == device && t.is_contiguous() && t.scalar_type() == dtype &&
                      t.numel() == expected_numel,
                  op, ": ", name, "[", i, "] must be a contiguous ", device, " ", dtype, " tensor of ",
                  expected_numel, " elements, got ", t.device(), " ", t.scalar_type(), " ", t.sizes(),
                  t.is_contiguous() ? "" : " (not contiguous)");
    };
    auto check_like_param = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
      check(t, dtype, numel, name);
      TORCH_CHECK(t.sizes() == a.params[i].sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(),
                  ", params[", i, "] ", a.params[i].sizes());
    };
    check(a.params[i], param_dtype, numel, "params");
    check_like_param(a.grads[i], param_dtype, "grads");
    if (!a.master_params.empty()) check_like_param(a.master_params[i], at::kFloat, "master_params");
    if (a.has_steps) check(a.state_steps[i], at::kFloat, 1, "state_steps");
    for (const StateArg& s : a.moments) {
      if (s.states.empty()) continue;
      check_like_param(s.states[i], state_dtype, s.name);
      if (fp8) check(s.scales[i], at::kFloat, (numel + a.block_size - 1) / a.block_size, s.scale_name);
    }
  }
  for (const auto& [name, scalar] : scalars) {
    if (!scalar->has_value()) continue;
    const at::Tensor& t = **scalar;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && (!scalars_on_device || t.device() == device), op,
                ": ", name, " must be a one-element float32 tensor", scalars_on_device ? " on the params' device" : "",
                ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
}

// ---- the ops' argument lists ----------------------------------------------------------------------
// max_block: the kernel's largest fp8 block; scalars_on_device: see check_step_args.

using OptionalScalar = std::optional<at::Tensor>;

inline void check_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            at::TensorList max_exp_avg_sq_scales, at::TensorList master_params,
                            at::TensorList state_steps, const OptionalScalar& lr_tensor, int64_t block_size,
                            const OptionalScalar& grad_scale, const OptionalScalar& found_inf, int64_t max_block,
                            bool scalars_on_device) {
  check_step_args({"fastopt::adam_step_", params, grads, master_params, state_steps, true,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false},
                    {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", exp_avg_sq_scales, false},
                    {"max_exp_avg_sqs", max_exp_avg_sqs, "max_exp_avg_sq_scales", max_exp_avg_sq_scales, true}},
                   block_size},
                  params[0].device(), max_block,
                  {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  scalars_on_device);
}

inline void check_lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_scales, at::TensorList master_params,
                            const OptionalScalar& lr_tensor, int64_t block_size, const OptionalScalar& grad_scale,
                            const OptionalScalar& found_inf, int64_t max_block, bool scalars_on_device) {
  check_step_args({"fastopt::lion_step_", params, grads, master_params, {}, false,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false}}, block_size},
                  params[0].device(), max_block,
                  {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  scalars_on_device);
}

inline void check_mars_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            at::TensorList max_exp_avg_sq_scales, at::TensorList last_grad_scales,
                            at::TensorList master_params, at::TensorList state_steps,
                            const OptionalScalar& lr_tensor, int64_t block_size, const OptionalScalar& grad_scale,
                            const OptionalScalar& found_inf, int64_t max_block, bool scalars_on_device) {
  check_step_args({"fastopt::mars_step_", params, grads, master_params, state_steps, true,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false},
                    {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", exp_avg_sq_scales, false},
                    {"max_exp_avg_sqs", max_exp_avg_sqs, "max_exp_avg_sq_scales", max_exp_avg_sq_scales, true},
                    {"last_grads", last_grads, "last_grad_scales", last_grad_scales, false}},
                   block_size},
                  params[0].device(), max_block,
                  {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  scalars_on_device);
}

inline void check_sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList hessians, at::TensorList exp_avg_scales, at::TensorList hessian_scales,
                              at::TensorList master_params, const OptionalScalar& lr_tensor, int64_t block_size,
                              const OptionalScalar& grad_scale, const OptionalScalar& found_inf, int64_t max_block,
                              bool scalars_on_device) {
  check_step_args({"fastopt::sophia_step_", params, grads, master_params, {}, false,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false},
                    {"hessians", hessians, "hessian_scales", hessian_scales, false}},
                   block_size},
                  params[0].device(), max_block,
                  {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  scalars_on_device);
}

// adam_mini_step_'s per-segment step sizes: one fp32 tensor per param, on its device, of numel /
// segment_lengths[i] elements, the segment length dividing the param's numel.
inline void check_adam_mini_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_scales, at::TensorList step_sizes,
                                 at::IntArrayRef segment_lengths, at::TensorList master_params,
                                 const OptionalScalar& lr_tensor, int64_t block_size, const OptionalScalar& grad_scale,
                                 const OptionalScalar& found_inf, int64_t max_block, bool scalars_on_device) {
  const char* op = "fastopt::adam_mini_step_";
  check_step_args({op, params, grads, master_params, {}, false,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false}}, block_size},
                  params[0].device(), max_block,
                  {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  scalars_on_device);
  check_list_length(op, step_sizes, params.size(), "step_sizes", false);
  TORCH_CHECK(segment_lengths.size() == params.size(), op, ": segment_lengths has ", segment_lengths.size(),
              " entries, expected ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel(), length = segment_lengths[i];
    TORCH_CHECK(length > 0 && numel % length == 0, op, ": segment_lengths[", i, "] = ", length,
                " does not divide params[", i, "]'s ", numel, " elements");
    const at::Tensor& s = step_sizes[i];
    TORCH_CHECK(s.device() == params[i].device() && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                    s.numel() == numel / length,
                op, ": step_sizes[", i, "] must be a contiguous ", params[i].device(), " Float tensor of ",
                numel / length, " elements, got ", s.device(), " ", s.scalar_type(), " ", s.sizes());
  }
}

}  // namespace fastopt
