#pragma once
/// \file diffq/detail/checkpoint_load.h
/// `load_quantized`'s core: matching a checkpoint's records to a model's parameters and buffers by
/// name, shape and dtype, then filling them in two phases (everything that can fail first, with
/// the model untouched; then writes only).

#include <diffq/detail/checkpoint_tensors.h>
#include <diffq/detail/glob.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <map>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace diffq {
namespace detail {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

/// How the records of a checkpoint map to a model's tensors (`targets`, by full dotted name).
/// Stored logits fill the model's parameters of the same name when it has them (a model wrapped
/// by a quantizer again, to resume training); a model without a quantizer ignores them.
struct RecordMatch {
  std::map<std::string, at::Tensor> targets;
  std::unordered_map<std::string, size_t> record_of;  ///< records that fill a target, by name
  std::vector<bool> used;                             ///< record r fills a target
  /// Index of the record holding the values of record `r` (its target for a tied name).
  size_t stored_index(const ParsedCheckpoint& pc, size_t r) const {
    return pc.records[r].kind == kKindAlias ? record_of.at(pc.records[r].target) : r;
  }
  /// The record holding the values of target `name`.
  size_t source_of(const ParsedCheckpoint& pc, const std::string& name) const {
    return stored_index(pc, record_of.at(name));
  }
};

inline RecordMatch match_records(torch::nn::Module& model, const ParsedCheckpoint& pc) {
  RecordMatch m;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    if (p.value().defined()) m.targets.emplace(p.key(), p.value());
  }
  for (const auto& b : model.named_buffers(/*recurse=*/true)) {
    if (b.value().defined()) m.targets.emplace(b.key(), b.value());
  }
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    m.used.push_back(rv.kind != kKindLogit || m.targets.count(rv.name) != 0);
    if (m.used.back()) m.record_of.emplace(rv.name, r);
  }
  return m;
}

/// The hint appended when a quantizer's logits (LSQ: step sizes), named with `suffix`, are among
/// the `missing` names; empty otherwise.
inline std::string missing_logits_hint(const ParsedCheckpoint& pc,
                                       const std::vector<std::string>& missing,
                                       const std::string& suffix) {
  const bool logits_missing =
      !suffix.empty() && std::any_of(missing.begin(), missing.end(), [&](const std::string& n) {
        return n.size() > suffix.size() && ends_with(n, suffix);
      });
  if (!logits_missing) return {};
  const bool has_logits = std::any_of(pc.records.begin(), pc.records.end(),
                                      [](const RecordView& rv) { return rv.kind == kKindLogit; });
  if (!has_logits) {
    return " the model carries a quantizer's logits or step sizes ('*" + suffix +
           "'), which the checkpoint does not store: load into a model without a quantizer, or "
           "save with include_logits = true;";
  }
  return " the checkpoint's logits or step sizes do not cover the model's ('*" + suffix +
         "'): wrap the model with the options the checkpoint was saved with;";
}

/// Throws, listing every name missing from the checkpoint, unexpected in it, or of another shape
/// or dtype, unless the records and the model's tensors match one to one. `aux_suffix`: the
/// wrapping quantizer's suffix when known, else the one the checkpoint's options record.
inline void check_match(const ParsedCheckpoint& pc, const RecordMatch& m, const std::string& source,
                        const std::string& aux_suffix, const std::string& where) {
  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& t : m.targets) {
    if (!m.record_of.count(t.first)) missing.push_back(t.first);
  }
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (!m.used[r]) continue;
    auto it = m.targets.find(rv.name);
    if (it == m.targets.end()) {
      unexpected.push_back(rv.name);
      continue;
    }
    const RecordView& sv = pc.records[m.stored_index(pc, r)];
    const at::ScalarType dt = scalar_type_of(sv.dtype);
    if (it->second.sizes() != at::IntArrayRef(sv.shape) || it->second.scalar_type() != dt) {
      mismatched.push_back("'" + rv.name + "' (record " + std::to_string(r) + " at byte " +
                           std::to_string(rv.offset) + "): checkpoint " + shape_str(sv.shape) +
                           " " + c10::toString(dt) + ", model " + shape_str(it->second.sizes()) +
                           " " + c10::toString(it->second.scalar_type()));
    }
  }
  if (missing.empty() && unexpected.empty() && mismatched.empty()) return;
  std::ostringstream os;
  os << where << ": " << source << ": the checkpoint does not match the model:";
  auto list = [&](const char* title, const std::vector<std::string>& v, bool quote) {
    if (v.empty()) return;
    os << " " << title << " (" << v.size() << "):";
    for (size_t i = 0; i < v.size(); ++i) {
      os << (i ? ", " : " ") << (quote ? "'" : "") << v[i] << (quote ? "'" : "");
    }
    os << ";";
  };
  list("missing from the checkpoint", missing, true);
  list("unexpected in the checkpoint", unexpected, true);
  list("mismatched shape or dtype", mismatched, false);
  const std::string* recorded = find_metadata(pc.metadata, std::string(kOptionPrefix) + "suffix");
  const std::string suffix = !aux_suffix.empty() ? aux_suffix : recorded ? *recorded : "";
  os << missing_logits_hint(pc, missing, suffix);
  TORCH_CHECK(false, escape_control(os.str()));
}

/// Throws unless every target can be filled in place (strided, writable here, no overlap).
inline void check_fillable(const RecordMatch& m, const std::string& source,
                           const std::string& where) {
  for (const auto& t : m.targets) {
    const at::Tensor& dst = t.second;
    auto fail = [&](const std::string& what) {
      TORCH_CHECK(false, where, ": ", source, ": cannot fill '", t.first, "': ", what);
    };
    if (dst.layout() != at::kStrided) {
      fail("it is a " + c10::str(dst.layout()) + " tensor; only strided tensors can be filled");
    }
    if (dst.is_inference() && !c10::InferenceMode::is_enabled()) {
      fail("it is an inference tensor, which can only be written inside c10::InferenceMode");
    }
    if (at::has_internal_overlap(dst) == at::MemOverlap::Yes) {
      fail("its elements overlap in memory (an expanded tensor)");
    }
  }
}

/// What the write phase copies, decoded beforehand (by record index): the levels of quantized
/// records and the values of the others; the step tables of quantized records filled in place;
/// full dequantized tensors of those copied (another device, non-contiguous targets).
struct DecodedRecords {
  std::vector<at::Tensor> values, steps, full;
};

/// Quantized records are dequantized straight into CPU contiguous targets (no full-size
/// temporary, no copy); other targets copy a full tensor.
inline bool fills_directly(const at::Tensor& dst) {
  return dst.device().is_cpu() && dst.is_contiguous();
}

inline DecodedRecords decode_for_load(const ParsedCheckpoint& pc, const RecordMatch& m) {
  DecodedRecords d;
  d.values = decode_all_levels(pc);
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind != kKindQuantized && rv.kind != kKindAlias && m.used[r]) {
      d.values[r] = decode_float_tensor(pc, r).to(scalar_type_of(rv.dtype));
    }
  }
  d.steps.resize(pc.records.size());
  d.full.resize(pc.records.size());
  for (const auto& t : m.targets) {
    const size_t s = m.source_of(pc, t.first);
    const RecordView& sv = pc.records[s];
    if (sv.kind != kKindQuantized) continue;
    if (fills_directly(t.second)) {
      if (!d.steps[s].defined()) {
        d.steps[s] = steps_by_width(sv.min, sv.max, scalar_type_of(sv.dtype));
      }
    } else if (!d.full[s].defined()) {
      d.full[s] = dequantize_record(sv, d.values[s]);
    }
  }
  return d;
}

/// The write phase: cannot fail.
inline void write_targets(const ParsedCheckpoint& pc, RecordMatch& m, const DecodedRecords& d) {
  at::NoGradGuard no_grad;
  for (auto& t : m.targets) {
    const size_t s = m.source_of(pc, t.first);
    const RecordView& sv = pc.records[s];
    at::Tensor& dst = t.second;
    if (sv.kind != kKindQuantized) {
      dst.copy_(d.values[s]);
    } else if (fills_directly(dst)) {
      const int16_t* lv = d.values[s].data_ptr<int16_t>();
      if (sv.dtype == kDtFloat32) {
        dequantize_record_into(sv, lv, d.steps[s], dst.data_ptr<float>());
      } else {
        dequantize_record_into(sv, lv, d.steps[s], dst.data_ptr<double>());
      }
      dst.unsafeGetTensorImpl()->bump_version();  // as an in-place copy_ would
    } else {
      dst.copy_(d.full[s]);
    }
  }
}

/// Fills `model` from the checkpoint in `src` (see `diffq::load_quantized`). `aux_suffix`: the
/// suffix of the wrapping quantizer's tensors when known (`restore_quantized`), for the hint when
/// they are missing from the checkpoint; else the one its options record.
inline void load_into_module(torch::nn::Module& model, const ByteSource& src,
                             const std::string& aux_suffix = std::string()) {
  const std::string where = "diffq::load_quantized";
  const ParsedCheckpoint pc = parse_checkpoint(src.data, src.size, where, src.name);
  RecordMatch m = match_records(model, pc);
  check_match(pc, m, src.name, aux_suffix, where);
  check_fillable(m, src.name, where);
  const DecodedRecords d = decode_for_load(pc, m);
  write_targets(pc, m, d);
}

}  // namespace detail
}  // namespace diffq
