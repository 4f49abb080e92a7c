#pragma once
/// \file diffq/detail/module_access.h
/// Removal of a registered parameter from a `torch::nn::Module`, which LibTorch (1.13 and 2.x)
/// offers no public call for. The registry `Module::parameters_` is protected; a pointer to that
/// member, formed inside a class derived from `Module`, is usable on any module (standard C++).

#include <torch/nn/module.h>

#include <string>

namespace diffq {
namespace detail {

struct ModuleParameterAccess : torch::nn::Module {
  static torch::OrderedDict<std::string, at::Tensor>& parameters_of(torch::nn::Module& module) {
    return module.*(&ModuleParameterAccess::parameters_);
  }
};

/// Removes parameter `name` (a leaf name, no dots) from `module`. Returns false if absent.
inline bool erase_parameter(torch::nn::Module& module, const std::string& name) {
  auto& params = ModuleParameterAccess::parameters_of(module);
  if (!params.contains(name)) return false;
  params.erase(name);
  return true;
}

}  // namespace detail
}  // namespace diffq
