#pragma once
/// \file diffq/detail/module_access.h
/// What the quantizers need to know of, or do to, a `torch::nn::Module` beyond its public API:
/// the removal of a registered parameter, which LibTorch (1.13 and 2.x) offers no public call for
/// (the registry `Module::parameters_` is protected; a pointer to that member, formed inside a
/// class derived from `Module`, is usable on any module, in standard C++), and whether a module's
/// forward writes its weight in place.

#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>

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

/// Whether `module`'s forward renormalises its `weight` in place: an Embedding or EmbeddingBag
/// built with `max_norm`.
inline bool renormalises_weight(const torch::nn::Module& module) {
  if (const auto* e = dynamic_cast<const torch::nn::EmbeddingImpl*>(&module)) {
    return e->options.max_norm().has_value();
  }
  if (const auto* e = dynamic_cast<const torch::nn::EmbeddingBagImpl*>(&module)) {
    return e->options.max_norm().has_value();
  }
  return false;
}

}  // namespace detail
}  // namespace diffq
