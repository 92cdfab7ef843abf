// Checks flash_attn_kvcache.cu's launchers against a double-precision reference: GQA and MHA, query
// tiles, lengths 0, 1 and off the chunk grid, rows that see no key, the model's strided cache (keys
// and values interleaved per token) with NaN past each length (must never be read), the vector and
// the element-wise load paths, one split (direct output) and several (merge kernel), causal or not,
// fp32, bf16 and fp16. Paged caches: a shuffled block table (each sequence's blocks scattered over
// the pool and out of order, a padded row stride, NaN blocks in the entries past each length and in
// the padding), block sizes 1, 5, 16, 24 and 80 (not dividing the 16-key chunks, or longer than a
// 64-key step), the pool interleaved (num_blocks, block_size, 2, Hk, D) or k and v in different
// layouts, lengths 0 and at the table's capacity.
#define EMU_MAIN
#include "test_common.h"

#include <algorithm>
#include <cmath>
#include <limits>

static bool close(double got, double want, double rel, double abs) {
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= rel * std::fabs(want) + abs;
}

struct AttnCase {
  DType t;
  int B, Sq, Hq, Hk, D;
  std::vector<int> lens;
  int64_t cache_len;
  bool causal;
  int splits;      // 0: the launcher's heuristic (emu::num_sms SMs)
  bool interleaved;  // the model's (B, cache_len, 2, Hk, D) cache, else separate contiguous k and v
  bool misalign;   // q, k and v one element off 16 bytes: the element-wise load path
  // paged: cache_len = max_blocks * block_size; the pool (num_blocks, block_size, 2, Hk, D) when
  // interleaved, else k (num_blocks, block_size, Hk, D) and v stored block-minor (block_size,
  // num_blocks, Hk, D), so k and v differ in strides too
  int block_size = 0;  // 0: not paged
};

static void run_attn(const AttnCase& c, unsigned seed) {
  const int before = failures;
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  const DType t = c.t;
  const size_t es = esize(t), off = c.misalign ? es : 0;
  const int64_t B = c.B, Sq = c.Sq, Hq = c.Hq, Hk = c.Hk, D = c.D, S = c.cache_len, group = Hq / Hk;
  // q: the query part of a (B, Sq, Hq + 2 Hk, D) projection output
  const int64_t qh = Hq + 2 * Hk;
  Buf qb(B * Sq * qh * D * es, off);
  const int64_t qs[3] = {Sq * qh * D, qh * D, D};
  // caches, rows past each length filled with NaN. Paged: B * max_blocks blocks for the sequences
  // and 2 more, all shuffled; the 2 extra fill every table entry no valid token is in.
  const bool paged = c.block_size > 0;
  const int64_t bs = paged ? c.block_size : S, max_blocks = paged ? S / bs : 1;
  const int64_t nb = paged ? B * max_blocks + 2 : B, tstride = max_blocks + 3;
  std::vector<int32_t> perm(nb), table(B * tstride);
  for (int64_t i = 0; i < nb; ++i) perm[i] = (int32_t)i;
  std::shuffle(perm.begin(), perm.end(), g);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < tstride; ++i) {
      const bool used = i < max_blocks && i * bs < c.lens[b];
      table[b * tstride + i] = used ? perm[b * max_blocks + i] : perm[nb - 1 - (b + i) % 2];
    }
  Buf kvb(nb * bs * 2 * Hk * D * es + 64, off, 0xff);
  int64_t ks[3], vs[3];
  void *kp, *vp;
  if (c.interleaved) {
    ks[0] = vs[0] = bs * 2 * Hk * D, ks[1] = vs[1] = 2 * Hk * D, ks[2] = vs[2] = D;
    kp = kvb.p;
    vp = (char*)kvb.p + Hk * D * es;
  } else {
    ks[0] = vs[0] = bs * Hk * D, ks[1] = vs[1] = Hk * D, ks[2] = vs[2] = D;
    if (paged) vs[0] = Hk * D, vs[1] = nb * Hk * D;
    kp = kvb.p;
    vp = (char*)kvb.p + nb * bs * Hk * D * es;
  }
  if (paged && bs == 1) ks[1] = vs[1] = 0;  // the host's stride_or_zero
  // element offsets of token j of sequence b, head 0
  auto krow = [&](int64_t b, int64_t j) {
    return paged ? table[b * tstride + j / bs] * ks[0] + j % bs * ks[1] : b * ks[0] + j * ks[1];
  };
  auto vrow = [&](int64_t b, int64_t j) {
    return paged ? table[b * tstride + j / bs] * vs[0] + j % bs * vs[1] : b * vs[0] + j * vs[1];
  };
  for (int64_t i = 0; i < B * Sq * qh * D; ++i) setv(t, qb.p, i, nd(g));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < c.lens[b]; ++j)
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t d = 0; d < D; ++d) {
          setv(t, kp, krow(b, j) + h * ks[2] + d, nd(g));
          setv(t, vp, vrow(b, j) + h * vs[2] + d, nd(g));
        }
  std::vector<int32_t> lens(c.lens.begin(), c.lens.end());
  Buf out(B * Sq * Hq * D * es), lse(B * Hq * Sq * 4);
  const double scale = 2.0 / std::sqrt((double)D);  // sharper than 1/sqrt(D): a less uniform softmax
  FlashAttnKvcacheArgs a{};
  a.type = t;
  a.q = qb.p, a.k = kp, a.v = vp, a.lens = lens.data(), a.out = out.p, a.lse = (float*)lse.p;
  for (int i = 0; i < 3; ++i) a.q_strides[i] = qs[i], a.k_strides[i] = ks[i], a.v_strides[i] = vs[i];
  a.B = B, a.Sq = Sq, a.Hq = Hq, a.Hk = Hk, a.D = D, a.cache_len = S;
  if (paged) a.block_table = table.data(), a.block_table_stride = tstride, a.block_size = bs, a.num_blocks = nb;
  a.softmax_scale = scale, a.causal = c.causal, a.num_sms = emu::num_sms, a.splits = c.splits;
  const FlashAttnKvcachePlan pl = flash_attn_kvcache_plan(a);
  std::vector<float> ws(pl.workspace_floats + 8, std::numeric_limits<float>::quiet_NaN());
  flash_attn_kvcache_launch(a, ws.data(), nullptr);

  std::string tag = std::string(nm(t)) + " B=" + std::to_string(B) + " Sq=" + std::to_string(Sq) + " Hq=" +
                    std::to_string(Hq) + " Hk=" + std::to_string(Hk) + " D=" + std::to_string(D) + " lens=";
  for (int l : c.lens) tag += std::to_string(l) + ",";
  tag += " cache=" + std::to_string(S) + (c.causal ? " causal" : "") + " splits=" + std::to_string(pl.splits) +
         " tiles=" + std::to_string(pl.tiles) +
         (c.interleaved ? " kv-interleaved" : "") + (c.misalign ? " misaligned" : "") +
         (paged ? " paged block_size=" + std::to_string(bs) : "");
  const double rel = t == DType::kFloat32 ? 1e-5 : t == DType::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;
  int shown = 0;
  auto fail = [&](const char* what, int64_t b, int64_t i, int64_t h, double got, double want) {
    if (shown++ < 5)
      printf("FAIL %s %s b=%lld t=%lld h=%lld: got %.8g want %.8g\n", tag.c_str(), what, (long long)b,
             (long long)i, (long long)h, got, want);
    ++failures;
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = c.lens[b];
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t hk = h / group;
        const int64_t last = c.causal ? std::min(len, i + len - Sq + 1) : len;  // keys [0, last)
        std::vector<double> s;
        double mx = -INFINITY;
        for (int64_t j = 0; j < last; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += getv(t, qb.p, b * qs[0] + i * qs[1] + h * qs[2] + d) *
                   getv(t, kp, krow(b, j) + hk * ks[2] + d);
          s.push_back(dot * scale);
          mx = std::max(mx, dot * scale);
        }
        double sum = 0;
        std::vector<double> o(D, 0.0);
        for (int64_t j = 0; j < last; ++j) {
          const double p = std::exp(s[j] - mx);
          sum += p;
          for (int64_t d = 0; d < D; ++d) o[d] += p * getv(t, vp, vrow(b, j) + hk * vs[2] + d);
        }
        const double want_lse = last > 0 ? mx + std::log(sum) : INFINITY;
        const double got_lse = ((float*)lse.p)[(b * Hq + h) * Sq + i];
        if (!close(got_lse, want_lse, 1e-5, 1e-5)) fail("lse", b, i, h, got_lse, want_lse);
        for (int64_t d = 0; d < D; ++d) {
          const double want = last > 0 ? o[d] / sum : 0.0;
          const double got = getv(t, out.p, ((b * Sq + i) * Hq + h) * D + d);
          if (!close(got, want, rel, 1e-5)) fail("out", b, i, h, got, want);
        }
      }
  }
  printf("%s  %s\n", failures == before ? "ok  " : "FAIL", tag.c_str());
}

int main() {
  using T = DType;
  unsigned seed = 1;
  // one split, writing the output directly; GQA 4:1, Sq 1, the model's interleaved cache
  run_attn({T::kFloat32, 2, 1, 8, 2, 64, {37, 150}, 160, true, 1, true, false}, seed++);
  // several splits: the merge; chunks of 16 keys (37: the last one partial) and 64 (150)
  run_attn({T::kFloat32, 2, 1, 8, 2, 64, {37, 150}, 160, true, 3, true, false}, seed++);
  // Sq 2 in bf16: an empty sequence beside one of 133 keys; 4 splits of 48 keys, the last empty
  run_attn({T::kBFloat16, 2, 2, 8, 2, 64, {0, 133}, 140, true, 4, true, false}, seed++);
  // one key for two query tokens: the first sees nothing (out 0, lse +inf); D 40 (5 lanes a key)
  run_attn({T::kBFloat16, 1, 2, 8, 2, 40, {1}, 8, true, 1, true, false}, seed++);
  run_attn({T::kBFloat16, 1, 2, 8, 2, 40, {1}, 8, true, 2, true, false}, seed++);
  // not causal, misaligned (element-wise loads), separate caches
  run_attn({T::kFloat32, 2, 2, 8, 2, 40, {70, 5}, 72, false, 2, false, true}, seed++);
  // the split heuristic (4 emulated SMs): 3 chunks of 112 keys, two softmax steps each
  run_attn({T::kBFloat16, 1, 1, 8, 2, 64, {300}, 300, false, 0, true, false}, seed++);
  // 12 query rows a kv head: two tiles, the causal limit of each
  run_attn({T::kFloat32, 1, 3, 4, 1, 32, {20}, 24, true, 2, true, false}, seed++);
  // MHA, D 8 (one lane a key), fp16
  run_attn({T::kFloat16, 1, 1, 2, 2, 8, {65}, 70, true, 1, false, false}, seed++);
  // D 256 (32 lanes a key), fp32, two splits
  run_attn({T::kFloat32, 1, 1, 2, 1, 256, {70}, 80, true, 2, true, false}, seed++);
  // paged, block_size 16: an empty sequence and one at the capacity of 10 blocks; three splits
  // (chunks of 16 and 64 keys) and the direct output
  run_attn({T::kFloat32, 3, 1, 8, 2, 64, {37, 160, 0}, 160, true, 3, true, false, 16}, seed++);
  run_attn({T::kBFloat16, 3, 1, 8, 2, 64, {37, 160, 0}, 160, true, 1, true, false, 16}, seed++);
  // block_size 1: every key its own block; Sq 3 causal, GQA 4:1
  run_attn({T::kBFloat16, 2, 3, 8, 2, 64, {70, 9}, 70, true, 2, true, false, 1}, seed++);
  // block_size 5 across chunks of 48 keys, MHA, misaligned, k and v in different layouts
  run_attn({T::kFloat16, 2, 2, 4, 4, 40, {150, 63}, 150, true, 4, false, true, 5}, seed++);
  // block_size 24, 8 query heads a kv head, the split heuristic, not causal
  run_attn({T::kBFloat16, 2, 1, 8, 1, 128, {300, 312}, 312, false, 0, true, false, 24}, seed++);
  // block_size 80, longer than a softmax step, D 256, one split; k and v in different layouts
  run_attn({T::kFloat32, 1, 2, 2, 1, 256, {240}, 240, true, 1, false, false, 80}, seed++);
  // Sq 4 against 2 keys: rows that see nothing; two tiles of query rows
  run_attn({T::kFloat32, 2, 4, 4, 2, 32, {2, 32}, 32, true, 2, true, false, 16}, seed++);
  run_attn({T::kFloat32, 1, 6, 4, 1, 32, {45}, 48, true, 3, false, false, 16}, seed++);
  // a table of no blocks
  run_attn({T::kFloat32, 1, 1, 4, 1, 32, {0}, 0, true, 0, true, false, 16}, seed++);
  printf("%s: %d failures (%ld launches)\n", failures ? "FAILED" : "PASSED", failures, emu::launches);
  return failures != 0;
}
