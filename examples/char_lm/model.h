#pragma once
/// \file examples/char_lm/model.h
/// The models of the character-level language model example, over bytes (vocabulary 256):
/// - `transformer`: a decoder-only Transformer. Token and position Embeddings, pre-norm blocks of
///   causal self-attention (`torch::nn::MultiheadAttention`, which uses its `in_proj_weight`
///   through a functional call) and a GELU feed-forward, a final LayerNorm, and an output
///   projection tied to the token embedding (logits = h·Eᵀ).
/// - `lstm`: a 2-layer LSTM between the same tied token embedding and output projection (the
///   paper's RNN case); the hidden size is d_model.
/// Both map int64 tokens `[B, T]` to logits `[B, T, 256]`, the logit at position t depending on
/// tokens 0..t only.

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace char_lm {

constexpr int64_t kVocab = 256;
/// The example's default batch (sequences of `context` bytes), shared with the overhead bench.
constexpr int64_t kDefaultBatch = 16;

struct ModelOptions {
  TORCH_ARG(std::string, arch) = "transformer";  ///< transformer | lstm
  TORCH_ARG(int64_t, layers) = 2;
  TORCH_ARG(int64_t, d_model) = 128;
  TORCH_ARG(int64_t, heads) = 4;
  TORCH_ARG(int64_t, ffn) = 512;      ///< hidden width of the feed-forward
  TORCH_ARG(int64_t, context) = 128;  ///< the longest sequence (position embeddings)
};

/// `[T, T]` float mask added to the attention scores: 0 on and below the diagonal, −∞ above it
/// (position i attends to positions ≤ i only).
inline torch::Tensor causal_mask(int64_t t) {
  return torch::full({t, t}, -std::numeric_limits<float>::infinity()).triu(1);
}

/// x + attn(ln1(x)), then x + fc2(gelu(fc1(ln2(x)))); x `[T, B, D]`.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t d, int64_t heads, int64_t ffn)
      : ln1(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        attn(register_module(
            "attn", torch::nn::MultiheadAttention(torch::nn::MultiheadAttentionOptions(d, heads)))),
        ln2(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        fc1(register_module("fc1", torch::nn::Linear(d, ffn))),
        fc2(register_module("fc2", torch::nn::Linear(ffn, d))) {}

  torch::Tensor forward(torch::Tensor x, const torch::Tensor& mask) {
    auto h = ln1(x);
    x = x + std::get<0>(attn->forward(h, h, h, /*key_padding_mask=*/torch::Tensor(),
                                      /*need_weights=*/false, mask));
    return x + fc2(torch::gelu(fc1(ln2(x))));
  }

  torch::nn::LayerNorm ln1;
  torch::nn::MultiheadAttention attn;
  torch::nn::LayerNorm ln2;
  torch::nn::Linear fc1;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Block);

struct CharLMImpl : torch::nn::Module {
  explicit CharLMImpl(const ModelOptions& o) : options(o) {
    TORCH_CHECK(o.arch() == "transformer" || o.arch() == "lstm",
                "char_lm: arch must be transformer or lstm, got '", o.arch(), "'");
    TORCH_CHECK(o.layers() >= 1 && o.d_model() >= 1 && o.context() >= 1 && o.ffn() >= 1,
                "char_lm: layers, d_model, ffn and context must be >= 1");
    tok = register_module("tok", torch::nn::Embedding(kVocab, o.d_model()));
    torch::NoGradGuard no_grad;
    // Small embeddings: the tied output projection starts near uniform logits.
    tok->weight.normal_(0, 0.02);
    if (o.arch() == "transformer") {
      TORCH_CHECK(o.heads() >= 1 && o.d_model() % o.heads() == 0,
                  "char_lm: d_model must be a multiple of heads, got d_model=", o.d_model(),
                  " and heads=", o.heads());
      pos = register_module("pos", torch::nn::Embedding(o.context(), o.d_model()));
      pos->weight.normal_(0, 0.02);
      blocks = register_module("blocks", torch::nn::ModuleList());
      for (int64_t i = 0; i < o.layers(); ++i)
        blocks->push_back(Block(o.d_model(), o.heads(), o.ffn()));
      ln_f =
          register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.d_model()})));
    } else {
      lstm =
          register_module("lstm", torch::nn::LSTM(torch::nn::LSTMOptions(o.d_model(), o.d_model())
                                                      .num_layers(o.layers())
                                                      .batch_first(true)));
    }
  }

  /// tokens: int64 `[B, T]`, T <= context; returns logits `[B, T, 256]`.
  torch::Tensor forward(const torch::Tensor& tokens) {
    const int64_t t = tokens.size(1);
    torch::Tensor h;
    if (options.arch() == "transformer") {
      TORCH_CHECK(t <= options.context(), "char_lm: a sequence of ", t,
                  " tokens is longer than the context, ", options.context());
      auto x = tok(tokens) + pos(torch::arange(t, tokens.options().dtype(torch::kLong)));
      x = x.transpose(0, 1);  // [T, B, D], MultiheadAttention's layout
      const auto mask = causal_mask(t).to(x.device());
      for (const auto& b : *blocks) x = b->as<BlockImpl>()->forward(x, mask);
      h = ln_f(x).transpose(0, 1);
    } else {
      h = std::get<0>(lstm(tok(tokens)));
    }
    return torch::nn::functional::linear(h, tok->weight);  // tied output projection
  }

  ModelOptions options;
  torch::nn::Embedding tok{nullptr};
  torch::nn::Embedding pos{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::LSTM lstm{nullptr};
};
TORCH_MODULE(CharLM);

}  // namespace char_lm
