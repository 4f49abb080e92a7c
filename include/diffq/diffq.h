#pragma once
/// \file diffq/diffq.h
/// Umbrella header of diffq: DiffQ, differentiable model compression by pseudo quantization noise
/// (Défossez, Adi, Synnaeve, TMLR 2022, arXiv 2104.09987), for LibTorch.
///
/// - `diffq/options.h`: `DiffQOptions`, `Noise`, `Param`;
/// - `diffq/bits.h`: bit widths from logits, quantization levels, model-size formula;
/// - `diffq/noise.h`: the fast deterministic pseudo quantization noise generator;
/// - `diffq/state.h`: the quantized state handed to checkpoints;
/// - `diffq/base_quantizer.h`: `BaseQuantizer`, the machinery shared by all quantizers, and
///   `QuantizedGuard`;
/// - `diffq/quantizer.h`: `DiffQuantizer<M>`;
/// - `diffq/budget.h`: `SizeBudget` (train to a model-size budget, λ by dual ascent) and
///   `lower_bits_to_fit`;
/// - `diffq/uniform.h`: `UniformQuantizer<M>`, `UniformOptions` (PTQ and QAT baselines);
/// - `diffq/lsq.h`: `LSQQuantizer<M>`, `LSQOptions` (Learned Step Size Quantization baseline);
/// - `diffq/checkpoint.h`: `save_quantized`, `load_quantized`, `read_checkpoint_info`;
/// - `diffq/distributed.h`: `DataParallel` and the process-group helpers (data parallelism on
///   c10d), included where `DIFFQ_WITH_DISTRIBUTED` is 1 (`DiffQ::diffq` defines it, 1 or 0, from
///   the CMake option), or without it where `USE_C10D_GLOO` is defined and the headers exist.

#include <diffq/base_quantizer.h>
#include <diffq/bits.h>
#include <diffq/budget.h>
#include <diffq/checkpoint.h>
#include <diffq/lsq.h>
#include <diffq/noise.h>
#include <diffq/options.h>
#include <diffq/quantizer.h>
#include <diffq/state.h>
#include <diffq/uniform.h>

// DiffQ::diffq defines DIFFQ_WITH_DISTRIBUTED (1 or 0); elsewhere, where the Gloo backend is.
#if defined(DIFFQ_WITH_DISTRIBUTED)
#if DIFFQ_WITH_DISTRIBUTED
#include <diffq/distributed.h>
#endif
#elif defined(USE_C10D_GLOO) && defined(__has_include)
#if __has_include(<torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>) && __has_include(<gloo/config.h>)
#include <diffq/distributed.h>
#endif
#endif
