// CTC decoding on the CPU over a batch: greedy (best path) and prefix beam search without a
// language model, utterances shared out across torch's intra-op threads (see for_each_utterance).
//
// The math is the one written in rnnkit/decoding/ctc.py (the pure-Python reference); this file
// only makes it fast, and must give the same n-best: the same label sequences in the same order,
// with the same scores. To that end it repeats the reference's arithmetic operation for
// operation in double precision (the reference converts log_probs to float64):
//
//   logaddexp(a, b) = b if a == -inf, a if b == -inf, else high + log1p(exp(low - high))
//   score(prefix)   = (P_blank ⊕ P_label) + 0·0 + β·len(prefix)      (no LM: α·log P_lm = 0·0)
//
// and visits prefixes in the reference's order: the next frame's prefixes are created in the
// order the reference inserts them into its dict (for each beam, best first: the beam itself,
// then its extensions by increasing class), and ranked by a stable sort on the score, highest
// first, as Python's sorted(..., reverse=True) is stable. Ties then break identically.
// Compiled with -ffp-contract=off, so no multiply-add is fused where Python rounds twice.
//
// Data structures: prefixes are nodes of a trie (a node's children are created on first use,
// in a table of C slots allocated the first time the node is expanded), so a prefix is one
// int32 and "the same prefix" is an integer compare; the frames at which labels start are a
// persistent linked list (extending a prefix shares its parent's list), since the reference's
// lists may be shorter than the prefix (a prefix reached only with probability 0 keeps none).
//
// Input checks (lengths, blank, finite log-probabilities) are made in Python before the call,
// with messages naming the problem; the TORCH_CHECKs here only guard memory safety.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// rnnkit.decoding.ctc._logaddexp, branch for branch.
inline double logaddexp(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  const double high = a > b ? a : b;
  const double low = a > b ? b : a;
  return high + std::log1p(std::exp(low - high));
}

// One decoded utterance: its hypotheses best first, each with its labels and the frames at which
// they start (the two lists can differ in length, see above), its fused score and log P_ctc.
struct Decoded {
  std::vector<std::vector<int64_t>> labels;
  std::vector<std::vector<int64_t>> timesteps;
  std::vector<double> scores;
  std::vector<double> log_probs;
};

// ---------------------------------------------------------------------------------------------
// Greedy: argmax per frame (first maximum; a NaN counts as the maximum and its first occurrence
// wins, as torch.max does), repeats collapsed, blanks dropped; the score is the best path's sum.

template <typename scalar_t>
void greedy_one(const scalar_t* lp, int64_t frame_stride, int64_t classes, int64_t length,
                int64_t blank, Decoded& out) {
  std::vector<int64_t> labels, timesteps;
  double path = 0.0;
  int64_t previous = blank;
  for (int64_t t = 0; t < length; ++t) {
    const scalar_t* row = lp + t * frame_stride;
    int64_t best = 0;
    double best_value = static_cast<double>(row[0]);
    if (!std::isnan(best_value)) {
      for (int64_t c = 1; c < classes; ++c) {
        const double value = static_cast<double>(row[c]);
        if (std::isnan(value)) {
          best = c;
          best_value = value;
          break;
        }
        if (value > best_value) {
          best = c;
          best_value = value;
        }
      }
    }
    path += best_value;
    if (best != blank && best != previous) {
      labels.push_back(best);
      timesteps.push_back(t);
    }
    previous = best;
  }
  out.labels.push_back(std::move(labels));
  out.timesteps.push_back(std::move(timesteps));
  out.scores.push_back(path);
  out.log_probs.push_back(path);
}

// ---------------------------------------------------------------------------------------------
// Prefix beam search.

struct Trie {
  std::vector<int32_t> parent, last, length, child_block;  // per node; child_block -1: none yet
  std::vector<int32_t> children;                           // blocks of `classes` node ids
  int64_t classes;

  explicit Trie(int64_t classes_) : classes(classes_) { add(-1, -1, 0); }

  int32_t add(int32_t p, int32_t label, int32_t len) {
    parent.push_back(p);
    last.push_back(label);
    length.push_back(len);
    child_block.push_back(-1);
    return static_cast<int32_t>(parent.size() - 1);
  }

  int32_t child(int32_t node, int32_t label) {
    if (child_block[node] < 0) {
      child_block[node] = static_cast<int32_t>(children.size());
      children.resize(children.size() + classes, -1);
    }
    const int64_t slot = child_block[node] + label;
    if (children[slot] < 0) {
      const int32_t made = add(node, label, length[node] + 1);
      children[slot] = made;  // `children` was not resized by add(): the slot is still valid
    }
    return children[slot];
  }
};

// The frames at which a prefix's labels start, as a persistent list: node i is (frame, previous).
struct Timesteps {
  std::vector<int32_t> frame, previous;
  int32_t push(int32_t t, int32_t prev) {
    frame.push_back(t);
    previous.push_back(prev);
    return static_cast<int32_t>(frame.size() - 1);
  }
  std::vector<int64_t> list(int32_t id) const {
    std::vector<int64_t> out;
    for (; id >= 0; id = previous[id]) out.push_back(frame[id]);
    std::reverse(out.begin(), out.end());
    return out;
  }
};

struct Beam {
  int32_t node;
  double blank, label;
  int32_t timesteps;
  double total() const { return logaddexp(blank, label); }
};

// A prefix of the next frame, as the reference's _Beam while the frame is processed.
struct Next {
  int32_t node;
  double blank = kNegInf, label = kNegInf;
  int32_t timesteps;
  double carried = kNegInf, started = kNegInf;
  int32_t started_from = -1;  // started_timesteps = [*list(started_from), t]
};

template <typename scalar_t>
void beam_one(const scalar_t* lp, int64_t frame_stride, int64_t classes, int64_t length,
              int64_t blank, int64_t beam_width, double beta, std::optional<double> prune_below,
              std::optional<double> beam_threshold, int64_t nbest, Decoded& out) {
  Trie trie(classes);
  Timesteps steps;
  // the slot of a node in the current beams / the next frame's prefixes, valid when the stamp
  // is the current frame (saves clearing a map every frame)
  std::vector<int32_t> beam_stamp, beam_slot, next_stamp, next_slot;
  auto fit = [&] {
    const size_t nodes = trie.parent.size();
    if (beam_stamp.size() < nodes) {
      beam_stamp.resize(nodes, -1);
      beam_slot.resize(nodes, -1);
      next_stamp.resize(nodes, -1);
      next_slot.resize(nodes, -1);
    }
  };
  auto score = [&](int32_t node, double total) {
    // the reference's beam.total + lm_weight * beam.lm_log_prob + beta * len(prefix), with
    // lm_weight = lm_log_prob = 0 when there is no LM
    return total + 0.0 * 0.0 + beta * static_cast<double>(trie.length[node]);
  };

  std::vector<Beam> beams{Beam{0, 0.0, kNegInf, -1}};
  std::vector<Next> next;
  std::vector<double> next_scores;
  std::vector<int32_t> order, candidates;
  std::vector<double> row(classes);
  for (int64_t t = 0; t < length; ++t) {
    for (int64_t c = 0; c < classes; ++c) row[c] = static_cast<double>(lp[t * frame_stride + c]);
    candidates.clear();
    for (int64_t c = 0; c < classes; ++c) {
      if (c != blank && (!prune_below.has_value() || row[c] >= *prune_below)) {
        candidates.push_back(static_cast<int32_t>(c));
      }
    }
    const int32_t stamp = static_cast<int32_t>(t);
    fit();
    for (size_t i = 0; i < beams.size(); ++i) {
      beam_stamp[beams[i].node] = stamp;
      beam_slot[beams[i].node] = static_cast<int32_t>(i);
    }
    next.clear();
    // The next frame's entry of `node`, created on first use; the reference's _entry: a new
    // entry keeps the timesteps of the same prefix in the current beams (if any).
    auto entry = [&](int32_t node, int32_t known_timesteps) -> size_t {
      if (next_stamp[node] == stamp) return static_cast<size_t>(next_slot[node]);
      next_stamp[node] = stamp;
      next_slot[node] = static_cast<int32_t>(next.size());
      Next made;
      made.node = node;
      made.timesteps = known_timesteps;
      next.push_back(made);
      return next.size() - 1;
    };
    for (const Beam& beam : beams) {
      const double total = beam.total();
      const size_t stay = entry(beam.node, beam.timesteps);
      double carried = total + row[blank];
      next[stay].blank = logaddexp(next[stay].blank, carried);
      const bool has_last = beam.node != 0;
      const int32_t last = has_last ? trie.last[beam.node] : -1;
      if (has_last) {
        // the last label again without a blank between: the same prefix, not a new label
        const double repeat = beam.label + row[last];
        next[stay].label = logaddexp(next[stay].label, repeat);
        carried = logaddexp(carried, repeat);
      }
      next[stay].carried = logaddexp(next[stay].carried, carried);
      for (const int32_t c : candidates) {
        const int32_t child = trie.child(beam.node, c);
        fit();
        const int32_t known = beam_stamp[child] == stamp ? beams[beam_slot[child]].timesteps : -1;
        const size_t extended = entry(child, known);
        // a repeated label only counts as a new label after a blank
        const double source = (has_last && c == last) ? beam.blank : total;
        const double started = source + row[c];
        Next& e = next[extended];
        e.label = logaddexp(e.label, started);
        if (started > e.started) {
          e.started = started;
          e.started_from = beam.timesteps;
        }
      }
    }
    next_scores.resize(next.size());
    for (size_t i = 0; i < next.size(); ++i) {
      Next& e = next[i];
      if (e.started > e.carried) e.timesteps = steps.push(stamp, e.started_from);
      next_scores[i] = score(e.node, logaddexp(e.blank, e.label));
      TORCH_CHECK(!std::isnan(next_scores[i]),
                  "rnnkit ctc_decode: a prefix score became NaN at frame ", t,
                  " (log_probs too large to add up)");
    }
    order.resize(next.size());
    std::iota(order.begin(), order.end(), 0);
    size_t kept = std::min<size_t>(order.size(), static_cast<size_t>(beam_width));
    // Python's sorted is stable: equal scores keep the order of creation. Breaking ties by that
    // order makes the ranking a strict total order, so only the kept ones need sorting.
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(kept),
                      order.end(), [&](int32_t a, int32_t b) {
                        return next_scores[a] > next_scores[b] ||
                               (next_scores[a] == next_scores[b] && a < b);
                      });
    if (beam_threshold.has_value() && kept > 0) {
      // the reference's fused(best) - beam_threshold, and its >= on every kept prefix
      const double floor = next_scores[order[0]] - *beam_threshold;
      size_t within = 0;
      while (within < kept && next_scores[order[within]] >= floor) ++within;
      kept = within;
    }
    beams.clear();
    for (size_t i = 0; i < kept; ++i) {
      const Next& e = next[order[i]];
      beams.push_back(Beam{e.node, e.blank, e.label, e.timesteps});
    }
  }
  // The beams are already ranked by score (the last frame's sort, or the single empty prefix);
  // the reference's final stable sort on the same scores leaves that order as it is.
  const size_t count = std::min<size_t>(beams.size(), static_cast<size_t>(nbest));
  for (size_t i = 0; i < count; ++i) {
    const Beam& beam = beams[i];
    std::vector<int64_t> labels(trie.length[beam.node]);
    for (int32_t node = beam.node; node != 0; node = trie.parent[node]) {
      labels[trie.length[node] - 1] = trie.last[node];
    }
    out.labels.push_back(std::move(labels));
    out.timesteps.push_back(steps.list(beam.timesteps));
    const double total = beam.total();
    out.scores.push_back(score(beam.node, total));
    out.log_probs.push_back(total);
  }
}

// ---------------------------------------------------------------------------------------------
// Batch entry points. Results: labels and timesteps of every hypothesis concatenated (int64),
// sizes (N, K, 2) = (number of labels, number of timesteps) per hypothesis, -1 where an
// utterance has fewer than K hypotheses, and scores (N, K, 2) = (score, log P_ctc), float64.

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_inputs(const at::Tensor& log_probs, const at::Tensor& lengths, int64_t blank) {
  TORCH_CHECK_VALUE(log_probs.dim() == 3 && log_probs.device().is_cpu(),
                    "rnnkit ctc_decode: log_probs must be a (T, N, C) CPU tensor");
  TORCH_CHECK_VALUE(log_probs.scalar_type() == at::kFloat || log_probs.scalar_type() == at::kDouble,
                    "rnnkit ctc_decode: log_probs must be float32 or float64, got ",
                    log_probs.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == log_probs.size(1) &&
                        lengths.scalar_type() == at::kLong && lengths.device().is_cpu(),
                    "rnnkit ctc_decode: lengths must be an int64 CPU tensor of N entries");
  TORCH_CHECK_VALUE(blank >= 0 && blank < log_probs.size(2),
                    "rnnkit ctc_decode: blank is outside the classes");
  TORCH_CHECK_VALUE(log_probs.size(2) < std::numeric_limits<int32_t>::max() &&
                        log_probs.size(0) < std::numeric_limits<int32_t>::max(),
                    "rnnkit ctc_decode: too many frames or classes");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t n = 0; n < lengths.size(0); ++n) {
    TORCH_CHECK_VALUE(len[n] >= 0 && len[n] <= log_probs.size(0), "rnnkit ctc_decode: length ",
                      len[n], " of utterance ", n, " is outside [0, ", log_probs.size(0), "]");
  }
}

Outputs pack(const std::vector<Decoded>& decoded, int64_t k) {
  const int64_t batch = static_cast<int64_t>(decoded.size());
  int64_t label_total = 0, step_total = 0;
  for (const Decoded& d : decoded) {
    for (const auto& l : d.labels) label_total += static_cast<int64_t>(l.size());
    for (const auto& s : d.timesteps) step_total += static_cast<int64_t>(s.size());
  }
  const auto long_options = at::TensorOptions().dtype(at::kLong);
  at::Tensor labels = at::empty({label_total}, long_options);
  at::Tensor timesteps = at::empty({step_total}, long_options);
  at::Tensor sizes = at::empty({batch, k, 2}, long_options).fill_(-1);
  at::Tensor scores = at::zeros({batch, k, 2}, at::TensorOptions().dtype(at::kDouble));
  int64_t* label_out = labels.data_ptr<int64_t>();
  int64_t* step_out = timesteps.data_ptr<int64_t>();
  int64_t* size_out = sizes.data_ptr<int64_t>();
  double* score_out = scores.data_ptr<double>();
  for (int64_t n = 0; n < batch; ++n) {
    const Decoded& d = decoded[n];
    for (size_t h = 0; h < d.labels.size(); ++h) {
      const int64_t at = (n * k + static_cast<int64_t>(h)) * 2;
      label_out = std::copy(d.labels[h].begin(), d.labels[h].end(), label_out);
      step_out = std::copy(d.timesteps[h].begin(), d.timesteps[h].end(), step_out);
      size_out[at] = static_cast<int64_t>(d.labels[h].size());
      size_out[at + 1] = static_cast<int64_t>(d.timesteps[h].size());
      score_out[at] = d.scores[h];
      score_out[at + 1] = d.log_probs[h];
    }
  }
  return {labels, timesteps, sizes, scores};
}

// Runs decode(n) for every utterance n, on torch's intra-op threads. Utterances are handed out
// `chunk` at a time from a shared counter rather than split into one fixed range per thread: on a
// loaded machine a thread the scheduler parks then delays only the chunk it holds, while the
// others take the rest (a fixed split would wait for its whole half of the batch). Results do
// not depend on which thread decodes what: every utterance is decoded alone, start to end.
template <typename Decode>
void for_each_utterance(int64_t batch, int64_t chunk, const Decode& decode) {
  const int64_t chunks = (batch + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers <= 1) {
    for (int64_t n = 0; n < batch; ++n) decode(n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      for (int64_t n = c * chunk; n < std::min(batch, (c + 1) * chunk); ++n) decode(n);
    }
  });
}

Outputs greedy(const at::Tensor& log_probs_in, const at::Tensor& lengths_in, int64_t blank) {
  // (lengths read through a raw pointer: a strided view was read as if contiguous, a silent
  // wrong answer)
  const at::Tensor lengths = lengths_in.contiguous();
  check_inputs(log_probs_in, lengths, blank);
  const at::Tensor log_probs = log_probs_in.contiguous();
  const int64_t batch = log_probs.size(1), classes = log_probs.size(2);
  const int64_t* len = lengths.data_ptr<int64_t>();
  std::vector<Decoded> decoded(batch);
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "rnnkit_ctc_greedy", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    // a greedy utterance costs microseconds: chunks of several, so threads pay off
    for_each_utterance(batch, 16, [&](int64_t n) {
      greedy_one<scalar_t>(lp + n * classes, batch * classes, classes, len[n], blank, decoded[n]);
    });
  });
  return pack(decoded, 1);
}

Outputs beam(const at::Tensor& log_probs_in, const at::Tensor& lengths_in, int64_t beam_width,
             int64_t blank, double beta, std::optional<double> prune_below, int64_t nbest,
             std::optional<double> beam_threshold) {
  const at::Tensor lengths = lengths_in.contiguous();  // (as greedy's)
  check_inputs(log_probs_in, lengths, blank);
  TORCH_CHECK_VALUE(beam_width >= 1 && nbest >= 1, "rnnkit ctc_decode: beam_width and nbest "
                    "must be at least 1");
  const at::Tensor log_probs = log_probs_in.contiguous();
  const int64_t batch = log_probs.size(1), classes = log_probs.size(2);
  const int64_t k = std::min(nbest, beam_width);
  const int64_t* len = lengths.data_ptr<int64_t>();
  std::vector<Decoded> decoded(batch);
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "rnnkit_ctc_beam", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    for_each_utterance(batch, 1, [&](int64_t n) {
      beam_one<scalar_t>(lp + n * classes, batch * classes, classes, len[n], blank, beam_width,
                         beta, prune_below, beam_threshold, k, decoded[n]);
    });
  });
  return pack(decoded, k);
}

}  // namespace

TORCH_LIBRARY(rnnkit_ctc_decode, m) {
  m.def("greedy(Tensor log_probs, Tensor lengths, int blank) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("beam(Tensor log_probs, Tensor lengths, int beam_width, int blank, float beta, "
        "float? prune_below, int nbest, float? beam_threshold) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.impl("greedy", c10::DispatchKey::CPU, TORCH_FN(greedy));
  m.impl("beam", c10::DispatchKey::CPU, TORCH_FN(beam));
}
