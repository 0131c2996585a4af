// The AMX-INT8 tiles of int8_gemm_vnni.cpp's exact int8 GEMM: where the CPU has AMX-INT8 (Intel
// Sapphire Rapids and later) the same product, c = a (M, K) int8 @ w^T over the same uint8 quad
// panels (fastlm.linear.pack_int8_quads: [p, kk, 4i + t] = w[16p + i, 4kk + t] + 128), is made with
// TDPBSUD (signed bytes of a x unsigned bytes of the panel, four per int32 lane, no saturation)
// instead of vpdpbusd, and the same correction c = sum (w + 128) a - 128 * rowsum(a): bit for bit the
// VNNI tiles' result (exact while K <= 65792, checked by the caller).
//
// A quad panel is exactly AMX's B-tile layout: 16 rows of 64 bytes = 16 quads of k x 16 channels, so
// a B tile is 1 KB read straight from the panel (stride 64). Per block of rows (int8_gemm_vnni_rows
// hands each thread its blocks, 128 rows on AMX) the block's activation rows are first copied into
// tile order ([pair of 16-row tiles][k step][16 rows][64 bytes], 64-byte aligned, zero past the rows
// and K: each A tile is then 1 KB contiguous), then for each pair of panels and each pair of row tiles
// 2 x 2 C tiles accumulate over all of K (tmm0-3: int32 C, tmm4-5: A, tmm6-7: B), are stored to a
// 32 x 32 scratch and copied out to c, the valid rows and channels only, less 128 * rowsum(a). Each
// panel pair is thus read once per block; the block's copied rows come from L2 for every panel pair
// (K chunks kept in L1 with the C tiles carried between chunks were not tried).
//
// Measured 2026-12-08 on a 2-vCPU Intel Xeon (AMX-INT8, AVX-512 VNNI), one thread, M 1024, prototypes
// of this loop nest: one TDPBSUD every 5.5 ns (~5.9 T int8 ops/s per core, register tiles only; ~4.8 T
// on random data); A read straight from its rows at stride K: 730-850 G ops/s; A copied into tile order
// but not 64-byte aligned (a std::vector's data): 1100-1600, aligned: 1700-2700 (a tile row straddling
// two cache lines costs every load twice the lines); 128-row blocks then 2000-2200 at BERT's FFN shapes.
// torch's _int_mm (oneDNN's s8s8s32 gemm_api, not AMX) ran 760 G ops/s inside BERT-base.
//
// Linux hands out AMX tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA, Linux 5.16+): asked once; where it is refused, or the CPU has no AMX-INT8, or fastlm._C
// is capped below AVX-512 (FASTLM_CPU_ISA), or torch.ops.fastlm.int8_gemm_tiles("vnni") turned AMX
// off, the VNNI tiles run instead.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define FASTLM_AMX_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FASTLM_AMX_FN __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#endif

namespace fastlm {
namespace {

#ifdef FASTLM_AMX_X86
bool cpu_has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx & (1u << 24)) && (edx & (1u << 25));  // AMX-TILE, AMX-INT8
}

bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023, kXtileData = 18;
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, kGetPerm, &mask) == 0 && (mask & (1ul << kXtileData))) return true;
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes. The config lives in memory the compiler cannot drop: gcc 12's
// _tile_loadconfig tells it only 8 bytes are read (the stores to the rest were removed at -O2).
FASTLM_AMX_FN void load_tile_config() {
  static TileConfig cfg = [] {
    TileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    return c;
  }();
  asm volatile("" ::: "memory");
  _tile_loadconfig(&cfg);
}

FASTLM_AMX_FN void release_tiles() { _tile_release(); }

// One panel pair (TWO) or one panel: C tiles zeroed, then the k steps [kb0, kb1) (of 16 quads), A from
// the packed row pair ap0 / ap1 (1 KB per k step), B straight from the panels p0 / p1; `tail_kb` (the
// last k step of a K with K4 % 16 != 0) reads the panels' zero-padded copies bt instead; C stored to
// acc (32 rows, ldp apart).
template <bool TWO>
FASTLM_AMX_FN void pair_chunk(const int8_t* ap0, const int8_t* ap1, const uint8_t* p0, const uint8_t* p1, int64_t kb0,
                              int64_t kb1, const uint8_t* bt, int64_t tail_kb, int32_t* acc, int64_t ldp) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (TWO) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint8_t* b0 = kb == tail_kb ? bt : p0 + kb * 1024;
    const uint8_t* b1 = kb == tail_kb ? bt + 1024 : p1 + kb * 1024;
    _tile_loadd(4, ap0 + kb * 1024, 64);
    _tile_loadd(6, b0, 64);
    _tile_dpbsud(0, 4, 6);
    if constexpr (TWO) {
      _tile_loadd(7, b1, 64);
      _tile_dpbsud(1, 4, 7);
    }
    _tile_loadd(5, ap1 + kb * 1024, 64);
    _tile_dpbsud(2, 5, 6);
    if constexpr (TWO) _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, acc, ldp * 4);
  _tile_stored(2, acc + 16 * ldp, ldp * 4);
  if constexpr (TWO) {
    _tile_stored(1, acc + 16, ldp * 4);
    _tile_stored(3, acc + 16 * ldp + 16, ldp * 4);
  }
}

FASTLM_AMX_FN void block_amx_impl(const int8_t* a, int64_t lda, int64_t mb, int64_t K, const uint8_t* quads,
                                  int64_t N, int64_t q0, int64_t q1, int32_t* c, int64_t ldc) {
  const int64_t K4 = (K + 3) / 4;           // quads per panel (rows of a are readable to 4 * K4)
  const int64_t nkb = (K4 + 15) / 16;       // k steps of 16 quads (64 k)
  const int64_t tail_kb = K4 % 16 ? nkb - 1 : -1;
  const int64_t npairs = (mb + 31) / 32;
  // the block's rows in tile order: [pair][2][nkb][16 rows][64], 64-byte aligned: a tile row that
  // straddles two cache lines made every A tile load twice the lines (the GEMM 1.5-2.2x slower). Kept
  // per thread (~128 x K bytes: 384 KB at K 3072, 8.4 MB at the K bound) and reused across calls.
  thread_local std::vector<int8_t> ap_buf;
  thread_local std::vector<int32_t> rsum;
  alignas(64) int32_t acc[32 * 32];         // one 32 x 32 output tile
  alignas(64) uint8_t bt[2048];             // a panel pair's last k step, zero-padded
  const size_t ap_bytes = static_cast<size_t>(npairs * 2 * nkb * 1024) + 64;
  if (ap_buf.size() < ap_bytes) ap_buf.resize(ap_bytes);
  int8_t* const ap = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(ap_buf.data()) + 63) & ~uintptr_t{63});
  if (rsum.size() < static_cast<size_t>(npairs * 32)) rsum.resize(static_cast<size_t>(npairs * 32));
  for (int64_t i = 0; i < npairs * 32; ++i) {
    int8_t* dst = ap + (i / 16) * nkb * 1024 + (i % 16) * 64;
    if (i >= mb) {
      for (int64_t kb = 0; kb < nkb; ++kb) std::memset(dst + kb * 1024, 0, 64);
      continue;
    }
    const int8_t* src = a + i * lda;
    rsum[i] = cpu::int8_row_sum(src, K);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t n = std::min<int64_t>(64, 4 * K4 - kb * 64);
      std::memcpy(dst + kb * 1024, src + kb * 64, n);
      if (n < 64) std::memset(dst + kb * 1024 + n, 0, 64 - n);
    }
  }
  load_tile_config();
  for (int64_t q = q0; q < q1; q += 2) {
    const bool two = q + 1 < q1;
    const uint8_t* p0 = quads + q * K4 * 64;
    const uint8_t* p1 = p0 + K4 * 64;
    if (tail_kb >= 0) {  // the panels end inside their last k step: zero-padded copies
      const int64_t n = (K4 - tail_kb * 16) * 64;
      std::memcpy(bt, p0 + tail_kb * 1024, n);
      std::memset(bt + n, 0, 1024 - n);
      if (two) {
        std::memcpy(bt + 1024, p1 + tail_kb * 1024, n);
        std::memset(bt + 1024 + n, 0, 1024 - n);
      }
    }
    const int64_t nv = std::min<int64_t>(N - q * 16, two ? 32 : 16);
    for (int64_t pr = 0; pr < npairs; ++pr) {
      const int8_t* ap0 = ap + pr * 2 * nkb * 1024;
      if (two)
        pair_chunk<true>(ap0, ap0 + nkb * 1024, p0, p1, 0, nkb, bt, tail_kb, acc, 32);
      else
        pair_chunk<false>(ap0, ap0 + nkb * 1024, p0, p0, 0, nkb, bt, tail_kb, acc, 32);
      // out: the valid rows and channels, less 128 * rowsum(a) (the + 128 of the unsigned weights)
      const int64_t rv = std::min<int64_t>(32, mb - pr * 32);
      const __mmask16 m0 = nv >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nv) - 1);
      const __mmask16 m1 = nv >= 32 ? __mmask16(0xFFFF) : nv <= 16 ? __mmask16(0) : __mmask16((1u << (nv - 16)) - 1);
      for (int64_t i = 0; i < rv; ++i) {
        const __m512i z = _mm512_set1_epi32(128 * rsum[pr * 32 + i]);
        int32_t* d = c + (pr * 32 + i) * ldc + (q - q0) * 16;
        _mm512_mask_storeu_epi32(d, m0, _mm512_sub_epi32(_mm512_load_si512(acc + i * 32), z));
        if (m1) _mm512_mask_storeu_epi32(d + 16, m1, _mm512_sub_epi32(_mm512_load_si512(acc + i * 32 + 16), z));
      }
    }
  }
  release_tiles();
}
#endif

std::atomic<bool> g_amx_off{false};

}  // namespace

namespace cpu {

bool amx_int8_usable() {
#ifdef FASTLM_AMX_X86
  static const bool hw = cpu_has_amx_int8();
  return hw && !g_amx_off.load(std::memory_order_relaxed) && avx512vnni_allowed() && amx_permitted();
#else
  return false;
#endif
}

void int8_block_amx(const int8_t* a, int64_t lda, int64_t mb, int64_t K, const uint8_t* quads, int64_t N, int64_t q0,
                    int64_t q1, int32_t* c, int64_t ldc) {
#ifdef FASTLM_AMX_X86
  block_amx_impl(a, lda, mb, K, quads, N, q0, q1, c, ldc);
#else
  (void)a, (void)lda, (void)mb, (void)K, (void)quads, (void)N, (void)q0, (void)q1, (void)c, (void)ldc;
  TORCH_CHECK(false, "int8_block_amx: this build has no AMX code");
#endif
}

}  // namespace cpu

namespace {

// Query ("") or set ("auto": AMX where usable; "vnni": the AVX-512 VNNI tiles even on an AMX CPU) the
// tiles of the quad-panel int8 GEMM. Returns "amx", "vnni" or "portable" (what runs now).
std::string int8_gemm_tiles(c10::string_view set) {
  if (set == "auto") {
    g_amx_off.store(false);
  } else if (set == "vnni") {
    g_amx_off.store(true);
  } else {
    TORCH_CHECK_VALUE(set.empty(), "int8_gemm_tiles: set must be \"\", \"auto\" or \"vnni\", got \"", set, "\"");
  }
  if (cpu::amx_int8_usable()) return "amx";
  return cpu::avx512vnni_allowed() ? "vnni" : "portable";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("int8_gemm_tiles(str set='') -> str", &int8_gemm_tiles); }

}  // namespace fastlm
