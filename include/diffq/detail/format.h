#pragma once
/// \file diffq/detail/format.h
/// The core of the compressed checkpoint format (`docs/checkpoint_format.md`) on raw bytes, in
/// four parts: `format_spec.h` (constants, layouts, codes), `format_writer.h` (the writer),
/// `format_reader.h` (parser and validator), `format_decoder.h` (decoders), and the header's
/// metadata block in `metadata.h`. Torch-free apart from `c10::Error`, so that the reader can be
/// fuzzed (`tests/fuzz/checkpoint_fuzz.cpp`) and sanitized without LibTorch's tensors. The
/// tensor-level API is `diffq/checkpoint.h`.

#include <diffq/detail/format_decoder.h>
#include <diffq/detail/format_reader.h>
#include <diffq/detail/format_spec.h>
#include <diffq/detail/format_writer.h>
#include <diffq/detail/metadata.h>
