#pragma once
/// \file diffq/detail/format_reader.h
/// The checkpoint reader and validator on raw bytes (`docs/checkpoint_format.md`): header,
/// metadata, record framing, CRCs, names, shapes, bit widths and every declared size, checked
/// against the bytes present before any allocation. Payloads stay undecoded views
/// (`format_decoder.h` decodes them).

#include <diffq/detail/format_spec.h>
#include <diffq/detail/metadata.h>

#include <c10/util/Exception.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace diffq {
namespace detail {

struct ChunkView {
  int bits = 0;
  uint8_t encoding = 0;
  uint64_t n = 0;  ///< levels in the chunk
  const uint8_t* payload = nullptr;
  uint32_t payload_bytes = 0;
  uint64_t offset = 0;  ///< file offset of the chunk header
};

struct RecordView {
  uint8_t kind = 0;
  uint8_t dtype = 0;
  uint8_t stored_dtype = 0;
  std::string name;
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  uint64_t offset = 0;  ///< file offset of the record
  uint64_t record_bytes = 0;
  // Quantized.
  int64_t group_size = 0;
  double min = 0, max = 0;
  std::vector<uint8_t> bits;  ///< [groups], decoded and checked
  std::vector<ChunkView> chunks;
  /// Chunks of segment `s`: `[segment_first[s], segment_first[s + 1])`.
  std::vector<size_t> segment_first;
  // Float kinds.
  uint8_t float_encoding = 0;
  const uint8_t* payload = nullptr;
  uint64_t payload_bytes = 0;
  uint64_t payload_offset = 0;
  // Alias.
  std::string target;
};

struct ParsedCheckpoint {
  uint32_t version = 0;
  uint64_t file_bytes = 0;
  uint32_t segment_elems = 0;
  /// The metadata block's entries, in file order; for a version-1 file with an options block,
  /// `method = diffq` and the options as `option.<name>` entries.
  MetadataEntries metadata;
  /// File offset of the metadata (or version-1 options) block, for messages about it.
  uint64_t metadata_offset = 0;
  /// Why a version-1 options block was set aside (values a quantizer refuses: files written
  /// before the writer checked them); empty otherwise. The options are informational: the
  /// tensors load.
  std::string options_problem;
  std::vector<RecordView> records;
  ErrorContext ctx;  ///< where/source, for errors of later decoding steps
};

struct ParseSettings {
  /// Verify the header and record CRCs. Only the fuzzer and the robustness tests turn this off,
  /// to reach the checks behind them.
  bool verify_crc = true;
};

/// Checks the header's frame (magic, version, header size, CRC) and returns a reader over the
/// header before its CRC, positioned after the header size field.
inline ByteReader header_reader(ByteReader& r, ParsedCheckpoint& pc, uint32_t& header_bytes,
                                const ParseSettings& settings) {
  const uint8_t* start = r.here();
  const size_t file_size = r.remaining();
  r.need(kMagic.size(), "magic");
  if (std::memcmp(r.here(), kMagic.data(), kMagic.size()) != 0) {
    r.fail("not a diffq checkpoint (bad magic; expected \"DIFFQCKP\")");
  }
  r.take(kMagic.size(), "magic");
  pc.version = r.u32("format version");
  if (pc.version != kFormatVersion && pc.version != kFormatVersion1) {
    r.fail(8, "unsupported format version " + std::to_string(pc.version) +
                  " (this reader supports versions 1 and 2)");
  }
  const uint64_t hb_off = r.offset();
  header_bytes = r.u32("header size");
  if (header_bytes < sizeof(FileHeaderFixed) + 4 || header_bytes > kMaxHeaderBytes) {
    r.fail(hb_off, "header size " + std::to_string(header_bytes) + " outside [" +
                       std::to_string(sizeof(FileHeaderFixed) + 4) + ", " +
                       std::to_string(kMaxHeaderBytes) + "]");
  }
  if (header_bytes > file_size) {
    r.fail(hb_off, "truncated header: declares " + std::to_string(header_bytes) +
                       " bytes, the file has " + std::to_string(file_size));
  }
  if (settings.verify_crc) {
    const uint32_t stored = load_le<uint32_t>(start + header_bytes - 4);
    const uint32_t computed = crc32(start, header_bytes - 4);
    if (stored != computed) {
      r.fail(header_bytes - 4, "header CRC mismatch (stored " + std::to_string(stored) +
                                   ", computed " + std::to_string(computed) + ")");
    }
  }
  ByteReader h(start, header_bytes - 4, 0, &r.ctx());
  h.take(16, "header");
  return h;
}

/// Reads the fixed header's fields after the header size (file size, counts, flags, segment
/// size) and checks them against the file's `file_size` bytes; returns the flags.
inline uint32_t parse_header_fields(ByteReader& h, ParsedCheckpoint& pc, uint32_t counts[5],
                                    uint32_t& num_records, size_t file_size,
                                    uint32_t header_bytes) {
  const uint64_t fb_off = h.offset();
  pc.file_bytes = h.u64("file size");
  if (pc.file_bytes != file_size) {
    h.fail(fb_off, "the header declares " + std::to_string(pc.file_bytes) +
                       " bytes but the file has " + std::to_string(file_size) +
                       (file_size < pc.file_bytes ? " (truncated)" : " (trailing bytes)"));
  }
  num_records = h.u32("record count");
  const uint64_t flags_off = h.offset();
  const uint32_t flags = h.u32("flags");
  if ((flags & ~kFlagMetadata) != 0) h.fail(flags_off, "unknown flags " + std::to_string(flags));
  const uint64_t ce_off = h.offset();
  pc.segment_elems = h.u32("segment size");
  if (pc.segment_elems < kMinSegmentElems || pc.segment_elems > kMaxSegmentElems ||
      (pc.segment_elems & (pc.segment_elems - 1)) != 0) {
    h.fail(ce_off, "segment size " + std::to_string(pc.segment_elems) +
                       " is not a power of two in [" + std::to_string(kMinSegmentElems) + ", " +
                       std::to_string(kMaxSegmentElems) + "]");
  }
  uint64_t sum = 0;
  for (int k = 0; k < 5; ++k) {
    counts[k] = h.u32("record counts");
    sum += counts[k];
  }
  if (sum != num_records) {
    h.fail(24, "record counts by kind add up to " + std::to_string(sum) + ", not " +
                   std::to_string(num_records));
  }
  // Every record takes at least kRecordOverheadBytes.
  if (num_records > (file_size - header_bytes) / kRecordOverheadBytes) {
    h.fail(24, std::to_string(num_records) + " records cannot fit in the " +
                   std::to_string(file_size - header_bytes) + " bytes after the header");
  }
  return flags;
}

/// Version 1's options block, checked as a quantizer checks its options; stored in
/// `pc.metadata` as `method = diffq` and `option.<name>` entries. Options a quantizer refuses
/// are set aside (`pc.options_problem`).
inline void parse_v1_options(ByteReader& h, ParsedCheckpoint& pc) {
  DiffQOptions o;
  o.group_size(h.i64("options"));
  o.min_bits(h.f64("options"));
  o.max_bits(h.f64("options"));
  o.init_bits(h.f64("options"));
  o.extra_bits(h.f64("options"));
  o.min_size_mb(h.f64("options"));
  const uint64_t b_off = h.offset();
  const uint8_t f16 = h.u8("options"), noise = h.u8("options"), param = h.u8("options"),
                bound = h.u8("options");
  if (f16 > 1 || noise > 1 || param > 1 || bound > 1) {
    h.fail(b_off,
           "invalid option flags (float16, noise, param, detect_bound must each be 0 or 1, got " +
               std::to_string(f16) + ", " + std::to_string(noise) + ", " + std::to_string(param) +
               ", " + std::to_string(bound) + ")");
  }
  o.float16(f16 == 1);
  o.noise(noise == 0 ? Noise::kGaussian : Noise::kUniform);
  o.param(param == 0 ? Param::kBits : Param::kNoise);
  o.detect_bound(bound == 1);
  const uint16_t suffix_bytes = h.u16("options");
  const uint16_t num_exclude = h.u16("options");
  o.suffix(h.str(suffix_bytes, "options suffix"));
  std::vector<std::string> ex;
  for (uint16_t i = 0; i < num_exclude; ++i) {
    const uint16_t len = h.u16("exclude pattern");
    ex.push_back(h.str(len, "exclude pattern"));
  }
  o.exclude(ex);
  pc.metadata.emplace_back("method", method_name(o));
  try {
    check_options(o, "options block");
  } catch (const c10::Error& e) {
    pc.options_problem = escape_control(pc.ctx.prefix(pc.metadata_offset) + e.msg());
    return;
  }
  for (auto& e : option_entries(o)) pc.metadata.emplace_back(kOptionPrefix + e.first, e.second);
}

/// Version 2's metadata block: u32 count, then (u16 key size, key, u16 value size, value) per
/// entry; keys valid (`metadata_key_problem`) and unique, values without NUL.
inline void parse_metadata(ByteReader& h, ParsedCheckpoint& pc) {
  const uint32_t n = h.u32("metadata entry count");
  if (n > h.remaining() / 5) {  // an entry takes at least 5 bytes
    h.fail(pc.metadata_offset, std::to_string(n) + " metadata entries cannot fit in the " +
                                   std::to_string(h.remaining()) + " bytes left in the header");
  }
  std::set<std::string> keys;
  for (uint32_t i = 0; i < n; ++i) {
    const uint64_t off = h.offset();
    std::string key = h.str(h.u16("metadata key size"), "metadata key");
    std::string value = h.str(h.u16("metadata value size"), "metadata value");
    const std::string key_problem = metadata_key_problem(key);
    if (!key_problem.empty())
      h.fail(off, "metadata entry " + std::to_string(i) + ": " + key_problem);
    const std::string value_problem = metadata_value_problem(value);
    if (!value_problem.empty()) h.fail(off, "metadata '" + key + "': " + value_problem);
    if (!keys.insert(key).second) h.fail(off, "duplicate metadata key '" + key + "'");
    pc.metadata.emplace_back(std::move(key), std::move(value));
  }
}

/// Parses the header: its frame, fields, and the metadata (or version-1 options) block.
inline void parse_header(ByteReader& r, ParsedCheckpoint& pc, uint32_t counts[5],
                         uint32_t& num_records, const ParseSettings& settings) {
  const size_t file_size = r.remaining();
  uint32_t header_bytes = 0;
  ByteReader h = header_reader(r, pc, header_bytes, settings);
  const uint32_t flags = parse_header_fields(h, pc, counts, num_records, file_size, header_bytes);
  if ((flags & kFlagMetadata) != 0) {
    pc.metadata_offset = h.offset();
    if (pc.version == kFormatVersion1) {
      parse_v1_options(h, pc);
    } else {
      parse_metadata(h, pc);
    }
  }
  if (h.remaining() != 0) {
    h.fail(std::to_string(h.remaining()) + " unexpected bytes at the end of the header");
  }
  r.take(header_bytes - 16, "header");
}

/// Group size, min and max of quantized record `rv`.
inline void parse_quantized_range(ByteReader& b, RecordView& rv) {
  const uint64_t gs_off = b.offset();
  rv.group_size = b.i64("group size");
  if (rv.group_size < 0) b.fail(gs_off, "group size " + std::to_string(rv.group_size) + " < 0");
  const uint64_t mm_off = b.offset();
  rv.min = b.f64("min");
  rv.max = b.f64("max");
  if (!(std::isfinite(rv.min) && std::isfinite(rv.max) && rv.min <= rv.max)) {
    std::ostringstream os;
    os << "min and max must be finite with min <= max, got min=" << rv.min << " max=" << rv.max;
    b.fail(mm_off, os.str());
  }
  if (!range_fits(rv.dtype, rv.min, rv.max)) {
    std::ostringstream os;
    os << "max - min must be finite in " << dtype_name(rv.dtype) << ", got min=" << rv.min
       << " max=" << rv.max;
    b.fail(mm_off, os.str());
  }
}

/// The bit widths of quantized record `rv` (packed nibbles, possibly deflated), each in 1..15.
inline void parse_bit_widths(ByteReader& b, RecordView& rv) {
  const uint64_t be_off = b.offset();
  const uint8_t bits_enc = b.u8("bit widths encoding");
  if (bits_enc > 1) b.fail(be_off, "unknown bit widths encoding " + std::to_string(bits_enc));
  for (int i = 0; i < 3; ++i) {
    if (b.u8("reserved") != 0) b.fail(be_off + 1, "reserved bytes are not zero");
  }
  const uint32_t bits_payload = b.u32("bit widths size");
  const uint64_t groups = groups_of(rv.numel, static_cast<uint64_t>(rv.group_size));
  const uint64_t nib_bytes = (groups + 1) / 2;
  const uint64_t bp_off = b.offset();
  const uint8_t* bp = b.take(bits_payload, "bit widths");
  std::vector<uint8_t> nib;
  if (bits_enc == 0) {
    if (bits_payload != nib_bytes) {
      b.fail(bp_off, "bit widths of " + std::to_string(groups) + " groups take " +
                         std::to_string(nib_bytes) + " bytes, got " + std::to_string(bits_payload));
    }
    nib.assign(bp, bp + bits_payload);
  } else {
    if (bits_payload == 0 || nib_bytes > kMaxDeflateRatio * bits_payload) {
      b.fail(bp_off, "compressed bit widths of " + std::to_string(bits_payload) +
                         " bytes cannot hold " + std::to_string(nib_bytes) + " bytes");
    }
    nib.resize(static_cast<size_t>(nib_bytes));
    std::string why;
    if (const char* err = inflate_raw_exact(bp, bits_payload, nib.data(), nib.size(), &why)) {
      b.fail(bp_off,
             std::string("bit widths: ") + err + (why.empty() ? "" : " (zlib: " + why + ")"));
    }
  }
  rv.bits.resize(static_cast<size_t>(groups));
  unpack_nibbles(nib.data(), static_cast<size_t>(groups), rv.bits.data());
  for (uint64_t g = 0; g < groups; ++g) {
    if (rv.bits[static_cast<size_t>(g)] == 0) {
      b.fail(bp_off, "bit width of group " + std::to_string(g) + " is 0 (must be in [1, 15])");
    }
  }
  if (groups % 2 == 1 && (nib.back() >> 4) != 0) {
    b.fail(bp_off, "padding nibble of the bit widths is not zero");
  }
}

/// Reads and checks the chunk of `cn` levels of width `w` in segment `[s0, s1)`.
inline ChunkView parse_chunk(ByteReader& b, int w, uint64_t cn, uint64_t s0, uint64_t s1) {
  ChunkView c;
  c.bits = w;
  c.n = cn;
  c.offset = b.offset();
  c.encoding = b.u8("chunk encoding");
  for (int i = 0; i < 3; ++i) {
    if (b.u8("chunk header") != 0) b.fail(c.offset + 1, "reserved bytes are not zero");
  }
  c.payload_bytes = b.u32("chunk size");
  const uint64_t min_bytes = (cn + 7) / 8;  // every level takes at least one bit
  const std::string where_chunk = "chunk of " + std::to_string(cn) + " " + std::to_string(w) +
                                  "-bit levels in elements [" + std::to_string(s0) + ", " +
                                  std::to_string(s1) + ")";
  if (c.encoding == kChunkBitpack) {
    if (c.payload_bytes != packed_bytes(cn, w)) {
      b.fail(c.offset, where_chunk + ": bit-packed size must be " +
                           std::to_string(packed_bytes(cn, w)) + " bytes, got " +
                           std::to_string(c.payload_bytes));
    }
  } else if (c.encoding == kChunkZlibBytes) {
    if (w > 8) b.fail(c.offset, where_chunk + ": zlib-bytes encoding needs bits <= 8");
    if (c.payload_bytes < 12 + min_bytes) {
      b.fail(c.offset,
             where_chunk + ": " + std::to_string(c.payload_bytes) + " bytes cannot hold them");
    }
  } else if (c.encoding == kChunkZlibPlanes) {
    if (w <= 8) b.fail(c.offset, where_chunk + ": zlib-planes encoding needs bits >= 9");
    const uint64_t need = 4 + 12 + min_bytes + packed_bytes(cn, w - 8);
    if (c.payload_bytes < need) {
      b.fail(c.offset,
             where_chunk + ": " + std::to_string(c.payload_bytes) + " bytes cannot hold them");
    }
  } else {
    b.fail(c.offset, where_chunk + ": unknown encoding " + std::to_string(c.encoding));
  }
  c.payload = b.take(c.payload_bytes, "chunk payload");
  return c;
}

/// The kind-specific part of quantized record `rv`: range, bit widths, then the chunks of each
/// segment (their count and sizes derived from the bit widths).
inline void parse_quantized(ByteReader& b, RecordView& rv, uint32_t segment_elems) {
  parse_quantized_range(b, rv);
  parse_bit_widths(b, rv);
  const uint64_t gs = index_group_size(rv.numel, static_cast<uint64_t>(rv.group_size));
  for (uint64_t s0 = 0; s0 < rv.numel; s0 += segment_elems) {
    const uint64_t s1 = std::min<uint64_t>(rv.numel, s0 + segment_elems);
    rv.segment_first.push_back(rv.chunks.size());
    const auto counts = segment_counts(rv.bits.data(), gs, s0, s1);
    for (int w = 1; w <= 15; ++w) {
      const uint64_t cn = counts[static_cast<size_t>(w)];
      if (cn == 0) continue;
      rv.chunks.push_back(parse_chunk(b, w, cn, s0, s1));
    }
  }
  rv.segment_first.push_back(rv.chunks.size());
}

inline void parse_float(ByteReader& b, RecordView& rv) {
  const uint64_t off = b.offset();
  rv.float_encoding = b.u8("float encoding");
  if (rv.float_encoding > kFloatZlib) {
    b.fail(off, "unknown float encoding " + std::to_string(rv.float_encoding));
  }
  for (int i = 0; i < 7; ++i) {
    if (b.u8("float header") != 0) b.fail(off + 1, "reserved bytes are not zero");
  }
  rv.payload_bytes = b.u64("float payload size");
  rv.payload_offset = b.offset();
  const uint64_t raw = rv.numel * static_cast<uint64_t>(dtype_bytes(rv.stored_dtype));
  if (rv.float_encoding == kFloatRaw && rv.payload_bytes != raw) {
    b.fail(off, std::to_string(rv.numel) + " elements of " + dtype_name(rv.stored_dtype) +
                    " take " + std::to_string(raw) + " bytes, got " +
                    std::to_string(rv.payload_bytes));
  }
  if (rv.float_encoding == kFloatZlib &&
      (rv.payload_bytes == 0 || raw / kMaxDeflateRatio > rv.payload_bytes)) {
    b.fail(off, "compressed payload of " + std::to_string(rv.payload_bytes) +
                    " bytes cannot hold " + std::to_string(raw) + " bytes");
  }
  rv.payload = b.take(rv.payload_bytes, "float payload");
}

/// Reads record `rv`'s size field at `r`'s position, checks it and the record's CRC, and returns a
/// reader over the record between its size field and its CRC (`r` moves past the record).
inline ByteReader record_reader(ByteReader& r, RecordView& rv, const ParseSettings& settings) {
  const uint64_t off = r.offset();
  const uint64_t rb = r.u64("record size");
  if (rb < kRecordOverheadBytes || rb - 8 > r.remaining()) {
    r.fail(off, "record size " + std::to_string(rb) + " outside [" +
                    std::to_string(kRecordOverheadBytes) + ", " +
                    std::to_string(r.remaining() + 8) + "] (bytes left in the file)");
  }
  const uint8_t* rec = r.here() - 8;
  if (settings.verify_crc) {
    const uint32_t stored = load_le<uint32_t>(rec + rb - 4);
    const uint32_t computed = crc32(rec, static_cast<size_t>(rb - 4));
    if (stored != computed) {
      r.fail(off + rb - 4, "record CRC mismatch (stored " + std::to_string(stored) + ", computed " +
                               std::to_string(computed) + ")");
    }
  }
  r.take(rb - 8, "record");
  rv.offset = off;
  rv.record_bytes = rb;
  return ByteReader(rec + 8, static_cast<size_t>(rb - 12), off + 8, &r.ctx());
}

/// The record's fixed part, name and shape (`file_size`: bytes of the whole file, which bound
/// the elements a shape may declare); returns `ndim`. Sets `ctx.name` once the name is read.
inline uint8_t parse_record_head(ByteReader& b, RecordView& rv, ErrorContext& ctx,
                                 size_t file_size) {
  const uint64_t fixed_off = b.offset();
  rv.kind = b.u8("record kind");
  rv.dtype = b.u8("dtype");
  rv.stored_dtype = b.u8("stored dtype");
  const uint8_t ndim = b.u8("ndim");
  const uint16_t name_bytes = b.u16("name size");
  if (b.u16("reserved") != 0) b.fail(fixed_off + 6, "reserved bytes are not zero");
  if (rv.kind < kKindQuantized || rv.kind > kKindLogit) {
    b.fail(fixed_off, "unknown record kind " + std::to_string(rv.kind));
  }
  if (name_bytes == 0) b.fail(fixed_off + 4, "empty tensor name");
  rv.name = b.str(name_bytes, "name");
  if (rv.name.find('\0') != std::string::npos) b.fail(fixed_off + 8, "name contains a NUL byte");
  ctx.name = rv.name;
  if (ndim > kMaxDims) {
    b.fail(fixed_off + 3, std::to_string(ndim) + " dims, at most " + std::to_string(kMaxDims));
  }
  // No record holds more than kMaxDeflateRatio elements per byte of the file (a deflated float
  // payload inflates at most that much; a quantized level takes at least a bit, checked later).
  // The product of the non-zero dims stays below 2^62 (as the writer's), so that the strides
  // of an empty tensor cannot overflow.
  const uint64_t shape_off = b.offset();
  uint64_t extent = 1;
  bool empty = false;
  for (int d = 0; d < ndim; ++d) {
    const uint64_t d_off = b.offset();
    const int64_t dim = b.i64("shape");
    if (dim < 0) b.fail(d_off, "negative dim " + std::to_string(dim));
    if (dim > 0 && extent > kMaxExtent / static_cast<uint64_t>(dim)) {
      b.fail(d_off, "the non-zero dims of the shape multiply to more than 2^62");
    }
    if (dim > 0) extent *= static_cast<uint64_t>(dim);
    empty = empty || dim == 0;
    rv.shape.push_back(dim);
  }
  rv.numel = empty ? 0 : extent;
  const uint64_t max_elems = kMaxDeflateRatio * static_cast<uint64_t>(file_size);
  if (rv.numel > max_elems) {
    b.fail(shape_off, "shape declares more elements than the file can hold (" +
                          std::to_string(rv.numel) + " > " + std::to_string(max_elems) +
                          ", 1032 per byte of the file)");
  }
  return ndim;
}

/// The kind-specific part of record `rv` (head read, `ndim` dims), which must end at the CRC.
inline void parse_record_body(ByteReader& b, RecordView& rv, uint8_t ndim, uint32_t segment_elems) {
  const uint64_t fixed_off = rv.offset + 8;
  if (rv.kind == kKindAlias) {
    if (rv.dtype != kDtNone || rv.stored_dtype != kDtNone || ndim != 0) {
      b.fail(fixed_off, "alias records have no dtype and no shape");
    }
    const uint16_t tb = b.u16("alias target size");
    if (tb == 0) b.fail("empty alias target");
    rv.target = b.str(tb, "alias target");
    if (rv.target.find('\0') != std::string::npos) b.fail("alias target contains a NUL byte");
  } else if (rv.kind == kKindQuantized) {
    if (rv.dtype != kDtFloat32 && rv.dtype != kDtFloat64) {
      b.fail(fixed_off + 1, std::string("quantized tensors are float32 or float64, got dtype ") +
                                dtype_name(rv.dtype));
    }
    if (rv.stored_dtype != kDtNone) b.fail(fixed_off + 2, "stored dtype must be 0");
    // Every level takes at least one bit of the record.
    if (rv.numel > 8 * rv.record_bytes) {
      b.fail(fixed_off, std::to_string(rv.numel) + " levels cannot fit in a record of " +
                            std::to_string(rv.record_bytes) + " bytes");
    }
    parse_quantized(b, rv, segment_elems);
  } else {
    if (dtype_bytes(rv.dtype) == 0)
      b.fail(fixed_off + 1, "unknown dtype " + std::to_string(rv.dtype));
    if (dtype_bytes(rv.stored_dtype) == 0) {
      b.fail(fixed_off + 2, "unknown stored dtype " + std::to_string(rv.stored_dtype));
    }
    if (rv.stored_dtype != rv.dtype &&
        !(rv.stored_dtype == kDtFloat16 && dtype_is_floating(rv.dtype))) {
      b.fail(fixed_off + 2, std::string("a ") + dtype_name(rv.dtype) +
                                " tensor cannot be stored as " + dtype_name(rv.stored_dtype));
    }
    parse_float(b, rv);
  }
  if (b.remaining() != 0) {
    b.fail(std::to_string(b.remaining()) + " unexpected bytes at the end of the record");
  }
}

/// Checks, once every record is read, the counts by kind against the header's and that every
/// alias names a stored quantized, float or buffer record.
inline void check_records(ParsedCheckpoint& pc, const uint32_t counts[5],
                          const std::unordered_map<std::string, size_t>& by_name) {
  ErrorContext& ctx = pc.ctx;
  ctx.record = -1;
  ctx.name.clear();
  uint32_t seen[5] = {0, 0, 0, 0, 0};
  for (const RecordView& rv : pc.records) ++seen[rv.kind - 1];
  for (int k = 0; k < 5; ++k) {
    if (seen[k] != counts[k]) {
      fail_at(ctx, 24,
              std::string("the header declares ") + std::to_string(counts[k]) + " " +
                  kind_name(static_cast<uint8_t>(k + 1)) + " records, the file holds " +
                  std::to_string(seen[k]));
    }
  }
  for (size_t i = 0; i < pc.records.size(); ++i) {
    const RecordView& rv = pc.records[i];
    if (rv.kind != kKindAlias) continue;
    auto it = by_name.find(rv.target);
    if (it == by_name.end() || pc.records[it->second].kind == kKindAlias ||
        pc.records[it->second].kind == kKindLogit) {
      ctx.record = static_cast<int64_t>(i);
      ctx.name = rv.name;
      fail_at(ctx, rv.offset,
              "tied name refers to '" + rv.target + "', which is not a stored tensor");
    }
  }
}

/// Parses and checks a whole checkpoint held in `[data, data + size)`: header, record framing,
/// CRCs, names, shapes, bit widths and every declared size (against the bytes present before any
/// allocation). Payloads stay undecoded (views into `data`, which must outlive the result).
/// Throws `c10::Error` prefixed by `"<where>: <source>: ... at byte <offset>: "`.
inline ParsedCheckpoint parse_checkpoint(const uint8_t* data, size_t size, const std::string& where,
                                         const std::string& source,
                                         const ParseSettings& settings = ParseSettings()) {
  ParsedCheckpoint pc;
  pc.ctx.where = where;
  pc.ctx.source = source;
  ErrorContext& ctx = pc.ctx;
  ByteReader r(data, size, 0, &ctx);
  uint32_t counts[5];
  uint32_t num_records = 0;
  parse_header(r, pc, counts, num_records, settings);
  std::unordered_map<std::string, size_t> by_name;
  pc.records.reserve(num_records);
  for (uint32_t i = 0; i < num_records; ++i) {
    ctx.record = i;
    ctx.name.clear();
    RecordView rv;
    ByteReader b = record_reader(r, rv, settings);
    const uint8_t ndim = parse_record_head(b, rv, ctx, size);
    parse_record_body(b, rv, ndim, pc.segment_elems);
    if (!by_name.emplace(rv.name, pc.records.size()).second) {
      fail_at(ctx, rv.offset, "duplicate tensor name '" + rv.name + "'");
    }
    pc.records.push_back(std::move(rv));
  }
  check_records(pc, counts, by_name);
  if (r.remaining() != 0) r.fail("unexpected bytes after the last record");
  return pc;
}

}  // namespace detail
}  // namespace diffq
