#pragma once
/// \file diffq/checkpoint.h
/// Compressed, bit-exact checkpoints of quantized models, and a loader for inference that needs no
/// quantizer. Format (version 2; specification: `docs/checkpoint_format.md`), little-endian:
/// - a header: magic `"DIFFQCKP"`, format version, sizes, record counts, and a metadata block of
///   text entries: the method (`diffq`, `uniform`, `qat`, `lsq`), its options, the library
///   version and the user's entries; then a CRC-32. Version-1 files (a `DiffQOptions` block in
///   place of the metadata) still load;
/// - one record per tensor, framed by its size and closed by its own CRC-32: name, dtype, shape,
///   then for a quantized tensor its group size, min, max, the 4-bit widths of its groups and its
///   integer levels, cut into segments of 2^18 elements coded in parallel, each segment one chunk
///   per bit width, stored as the smaller of bit-packing and Huffman coding (four literal-only
///   deflate streams); for the others (non-quantized parameters, fp16 with `float16`; buffers;
///   optional logits) the raw elements or a deflate stream of their byte planes; tied names as
///   aliases.
///
/// Loading rebuilds each quantized tensor as `w = min + level·(max − min)/(2^b − 1)` per group,
/// bit for bit equal to `diffq::dequantize_levels` (the quantizer's eval-mode weights).
///
/// Readers trust no size: truncations, flipped bytes, wrong magic or version, inconsistent
/// counts or sizes, shapes that do not match the model each throw a `c10::Error` naming the
/// source (the file name, `"<stream>"` or `"<bytes>"`), the record and the byte offset, e.g.
/// `"diffq::load_quantized: model.ckpt: record 3 at byte 1234: record CRC mismatch (stored ...,
/// computed ...)"`; nothing is allocated beyond what the bytes present can justify, and a model
/// is left untouched when loading fails. The code: `detail/format_*.h` (the format on raw bytes),
/// `detail/checkpoint_{io,tensors,load}.h` (files and streams, tensors, loading into a module).

#include <diffq/detail/checkpoint_io.h>
#include <diffq/detail/checkpoint_load.h>
#include <diffq/detail/checkpoint_tensors.h>
#include <diffq/detail/metadata.h>
#include <diffq/options.h>
#include <diffq/state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <istream>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace diffq {

/// What `read_checkpoint_info` tells about one stored tensor (one record).
struct TensorInfo {
  std::string name;
  /// `"quantized"`, `"float"` (a non-quantized parameter), `"buffer"`, `"alias"` or `"logit"`.
  std::string kind;
  std::vector<int64_t> shape;  ///< empty for aliases
  /// Dtype of the tensor (`Undefined` for aliases).
  at::ScalarType dtype = at::ScalarType::Undefined;
  int64_t group_size = 0;   ///< quantized tensors only
  double min = 0, max = 0;  ///< quantized tensors only
  /// Quantized tensors: `bits_histogram[b]` = number of groups of `b` bits (b in 1..15).
  std::array<int64_t, 16> bits_histogram{};
  /// Bytes of the whole record in the file (framing, header and payload).
  int64_t stored_bytes = 0;
  /// How the data is stored: for quantized tensors the chunk encodings used (`"bitpack"`,
  /// `"zlib-bytes"`, `"zlib-planes"`, several joined by `'+'`); for the others the stored dtype
  /// (`"float32"`, `"float16"`, `"int64"`, ...), prefixed by `"zlib-"` when deflated; `"alias"`.
  std::string encoding;
  std::string target;  ///< aliases: the name the tensor is stored under
};

/// What `read_checkpoint_info` tells about a checkpoint.
struct CheckpointInfo {
  uint32_t version = 0;  ///< format version: 2, or 1 for files of diffq 0.1
  int64_t file_bytes = 0;
  /// The quantization method: `"diffq"`, `"uniform"`, `"qat"` or `"lsq"`; empty when the writer
  /// recorded none (`save_quantized_state` without options).
  std::string method;
  /// The method's options as text `(name, value)`, in file order, by the names of their setters
  /// (`"group_size"`, `"min_bits"`, ...; a list `exclude` as `exclude.0`, `exclude.1`, ...).
  std::vector<std::pair<std::string, std::string>> method_options;
  /// The same options typed, for the method's options struct (when they read back and pass its
  /// checks; otherwise a warning says why they are not reported).
  c10::optional<DiffQOptions> options;
  c10::optional<UniformOptions> uniform_options;
  c10::optional<LSQOptions> lsq_options;
  std::string library_version;                       ///< of the writer; empty for version 1
  std::map<std::string, std::string> user_metadata;  ///< the user's entries (`save_quantized`)
  std::vector<TensorInfo> tensors;                   ///< in file order
};

/// The user's own entries that a checkpoint records, e.g. `{{"model", "resnet18"}}`: keys of 1 to
/// 250 bytes of printable ASCII without spaces, values of at most 65535 bytes without NUL.
using UserMetadata = std::map<std::string, std::string>;

namespace detail {

/// The typed options of `pc`'s method `O`, if its `option.*` entries read back as `O`; otherwise
/// none, with a warning saying why.
template <class O>
c10::optional<O> typed_options(const ParsedCheckpoint& pc,
                               const std::vector<std::pair<std::string, std::string>>& entries) {
  O o;
  const std::string problem = options_from_entries(entries, o);
  if (problem.empty()) return o;
  TORCH_WARN(escape_control(pc.ctx.prefix(pc.metadata_offset) + "metadata: " + problem),
             "; the options are not reported");
  return c10::nullopt;
}

/// The metadata of `pc` as `info`'s method, options, library version and user entries.
inline void read_metadata_info(const ParsedCheckpoint& pc, CheckpointInfo& info) {
  for (const auto& e : pc.metadata) {
    if (e.first == "method") {
      info.method = e.second;
    } else if (e.first == "library_version") {
      info.library_version = e.second;
    } else if (starts_with(e.first, kOptionPrefix)) {
      info.method_options.emplace_back(e.first.substr(std::strlen(kOptionPrefix)), e.second);
    } else if (starts_with(e.first, kUserPrefix)) {
      info.user_metadata.emplace(e.first.substr(std::strlen(kUserPrefix)), e.second);
    }  // other keys: entries of a later writer, not reported
  }
  if (!pc.options_problem.empty()) {
    TORCH_WARN(pc.options_problem, "; the options are not reported");
  } else if (info.method == "diffq") {
    info.options = typed_options<DiffQOptions>(pc, info.method_options);
  } else if (info.method == "uniform" || info.method == "qat") {
    info.uniform_options = typed_options<UniformOptions>(pc, info.method_options);
  } else if (info.method == "lsq") {
    info.lsq_options = typed_options<LSQOptions>(pc, info.method_options);
  }
}

inline CheckpointInfo info_from_source(const ByteSource& src) {
  ParsedCheckpoint pc =
      parse_checkpoint(src.data, src.size, "diffq::read_checkpoint_info", src.name);
  CheckpointInfo info;
  info.version = pc.version;
  info.file_bytes = static_cast<int64_t>(pc.file_bytes);
  read_metadata_info(pc, info);
  for (const RecordView& rv : pc.records) {
    TensorInfo t;
    t.name = rv.name;
    t.kind = kind_name(rv.kind);
    t.shape = rv.shape;
    t.dtype = scalar_type_of(rv.dtype);
    t.stored_bytes = static_cast<int64_t>(rv.record_bytes);
    if (rv.kind == kKindQuantized) {
      t.group_size = rv.group_size;
      t.min = rv.min;
      t.max = rv.max;
      for (uint8_t b : rv.bits) ++t.bits_histogram[b];
      bool used[3] = {false, false, false};
      for (const ChunkView& c : rv.chunks) used[c.encoding] = true;
      for (int e = 0; e < 3; ++e) {
        if (!used[e]) continue;
        if (!t.encoding.empty()) t.encoding += "+";
        t.encoding += chunk_encoding_name(static_cast<uint8_t>(e));
      }
      if (t.encoding.empty()) t.encoding = "bitpack";  // no element
    } else if (rv.kind == kKindAlias) {
      t.encoding = "alias";
      t.target = rv.target;
      t.shape.clear();
    } else {
      t.encoding =
          std::string(rv.float_encoding == kFloatZlib ? "zlib-" : "") + dtype_name(rv.stored_dtype);
    }
    info.tensors.push_back(std::move(t));
  }
  return info;
}

/// The metadata a bare state is saved with: the DiffQ options when given.
inline CheckpointMetadata state_metadata(const c10::optional<DiffQOptions>& options,
                                         const UserMetadata& user, const std::string& where) {
  if (options) return checkpoint_metadata(*options, user, where);
  return {std::string(), {}, user};
}

}  // namespace detail

// -------------------------------------------------------------------------------------------------
// Writing.

/// Writes `state` as a checkpoint to `dest`: a path (atomically: a temporary file in the same
/// folder, flushed to the disk, renamed over `path`, the folder flushed; on failure a previous
/// file is left intact), a `std::ostream&`, or a `std::vector<uint8_t>&` (its content replaced).
/// `options`, when given, are recorded as method `diffq` with them; `user` entries are recorded
/// as they are (both informational, for `read_checkpoint_info`). Returns the bytes written.
/// Throws `c10::Error` (`"diffq::save_quantized: ..."`) on invalid state (duplicate names, bit
/// widths outside [1, 15], levels out of range, non-finite min/max, ...), options a quantizer
/// refuses, user entries the format cannot hold, or I/O failure.
template <class Dest>
size_t save_quantized_state(const QuantizedState& state, Dest&& dest,
                            const c10::optional<DiffQOptions>& options = c10::nullopt,
                            const UserMetadata& user = {}) {
  const std::string where = "diffq::save_quantized";
  return detail::write_encoded(
      detail::encode_state(state, detail::state_metadata(options, user, where), where),
      std::forward<Dest>(dest), where);
}

/// Saves a quantizer's model (`q.quantized_state(include_logits)`) to `dest` (a path, a
/// `std::ostream&` or a `std::vector<uint8_t>&`, as `save_quantized_state`), recording its
/// method (`diffq`, `uniform`, `qat`, `lsq`), its options and the `user` entries. Works for every
/// quantizer (`DiffQuantizer`, `UniformQuantizer`, `LSQQuantizer`). Returns the bytes written.
template <class Quantizer, class Dest>
size_t save_quantized(const Quantizer& q, Dest&& dest, bool include_logits = false,
                      const UserMetadata& user = {}) {
  const std::string where = "diffq::save_quantized";
  const detail::CheckpointMetadata meta = detail::checkpoint_metadata(q.options(), user, where);
  return detail::write_encoded(detail::encode_state(q.quantized_state(include_logits), meta, where),
                               std::forward<Dest>(dest), where);
}

// -------------------------------------------------------------------------------------------------
// Reading.

/// Fills `model` (a freshly built model of the same architecture, no quantizer needed) from a
/// checkpoint, by the full dotted names of its parameters and buffers (`named_parameters()` and
/// `named_buffers()`, recursive). Quantized tensors get exactly the quantizer's eval-mode weights;
/// tied names get their target's value. Stored logits (`save_quantized(q, path, true)`) fill the
/// model's parameters of the same name when it has them, i.e. when the model is wrapped by a
/// quantizer again (e.g. to resume training from the quantized weights), and are ignored
/// otherwise; for a wrapped model use `restore_quantized(q, ...)`, which first ends any weight
/// substitution of the quantizer (else the loaded weights could land in its noisy or quantized
/// copy and be lost). Every parameter and buffer of the model must be in the checkpoint and vice
/// versa, with the same shape and dtype: all the missing, unexpected and mismatched names are
/// listed in one `c10::Error`. Corrupt input throws (see the file comment). On any error the
/// model is left untouched.
inline void load_quantized(torch::nn::Module& model, const std::string& path) {
  detail::load_into_module(model, detail::source_from_file(path, "diffq::load_quantized"));
}
inline void load_quantized(torch::nn::Module& model, std::istream& in) {
  detail::load_into_module(model, detail::source_from_stream(in, "diffq::load_quantized"));
}
inline void load_quantized(torch::nn::Module& model, const std::vector<uint8_t>& bytes) {
  detail::load_into_module(model, detail::source_from_bytes(bytes.data(), bytes.size()));
}
/// `load_quantized` on a `std::shared_ptr` to a module.
template <class M, class Source>
void load_quantized(const std::shared_ptr<M>& model, Source&& source) {
  TORCH_CHECK(model != nullptr, "diffq::load_quantized: null model");
  load_quantized(static_cast<torch::nn::Module&>(*model), std::forward<Source>(source));
}
/// `load_quantized` on a module holder (`torch::nn::Linear`, `TORCH_MODULE` types).
template <class M, class Source>
void load_quantized(const torch::nn::ModuleHolder<M>& model, Source&& source) {
  load_quantized(model.ptr(), std::forward<Source>(source));
}

/// Loads a checkpoint into the model wrapped by quantizer `q` (`DiffQuantizer`, `UniformQuantizer`,
/// `LSQQuantizer`): `load_quantized(*q.model(), source)` after `q.restore_clean_weights()`, so that
/// nothing is written into a copy the quantizer substituted. The model's logits (LSQ: step sizes)
/// are parameters that must be in the checkpoint like the others, so it must be saved with them
/// (`save_quantized(q, path, /*include_logits=*/true)`); they replace the quantizer's: e.g. to
/// resume training from the quantized weights (an optimizer's state is not restored). `source`: a
/// path, a `std::istream&` or a `std::vector<uint8_t>`. Throws under `quantize()` or a
/// `QuantizedGuard`, and like `load_quantized`; on failure the clean weights and the logits are
/// untouched (a substitution, if any, has ended all the same).
template <class Quantizer, class Source>
void restore_quantized(Quantizer& q, Source&& source) {
  TORCH_CHECK(q.model() != nullptr, "diffq::restore_quantized: null model");
  q.restore_clean_weights();
  detail::load_into_module(
      static_cast<torch::nn::Module&>(*q.model()),
      detail::byte_source(std::forward<Source>(source), "diffq::load_quantized"), q.aux_suffix());
}

/// Reads a checkpoint back into a `QuantizedState` (levels, bit widths, min/max, floats in their
/// dtype with `float16` set when stored as fp16, buffers, logits, tied names), e.g. to resume
/// training with a quantizer. Throws like `load_quantized` (prefix `diffq::read_quantized_state`).
inline QuantizedState read_quantized_state(const std::string& path) {
  const std::string where = "diffq::read_quantized_state";
  return detail::state_from_source(detail::source_from_file(path, where), where);
}
inline QuantizedState read_quantized_state(std::istream& in) {
  const std::string where = "diffq::read_quantized_state";
  return detail::state_from_source(detail::source_from_stream(in, where), where);
}
inline QuantizedState read_quantized_state(const std::vector<uint8_t>& bytes) {
  return detail::state_from_source(detail::source_from_bytes(bytes.data(), bytes.size()),
                                   "diffq::read_quantized_state");
}

/// Per-tensor description of a checkpoint (name, kind, shape, dtype, bit width histogram, stored
/// bytes, encoding) without decoding the payloads. Checks the whole file (CRCs included); throws
/// like `load_quantized` (prefix `diffq::read_checkpoint_info`).
inline CheckpointInfo read_checkpoint_info(const std::string& path) {
  return detail::info_from_source(detail::source_from_file(path, "diffq::read_checkpoint_info"));
}
inline CheckpointInfo read_checkpoint_info(std::istream& in) {
  return detail::info_from_source(detail::source_from_stream(in, "diffq::read_checkpoint_info"));
}
inline CheckpointInfo read_checkpoint_info(const std::vector<uint8_t>& bytes) {
  return detail::info_from_source(detail::source_from_bytes(bytes.data(), bytes.size()));
}

}  // namespace diffq
