// The host runner: executes the CUDA kernels of csrc/, compiled for the CPU (rk_host.h), one CTA
// after another. Test-only (docs/DESIGN.md "Host runner").
//
// * CTA order: blockIdx order, or (rk_host_configure_order(seed), seed != 0) a pseudo-random
//   permutation of the grid fixed by the seed: what a kernel whose CTAs communicate through
//   global memory (arrival counters: the last arrival merges) must not depend on.
// * Threads: each thread of the running CTA is a fiber with its own stack. A fiber runs
//   until it blocks at __syncthreads or at a warp-collective operation; the scheduler then runs
//   the next runnable fiber (fixed round-robin order, so every run is deterministic).
// * __syncthreads is a barrier of every thread of the CTA. Reaching it after some threads of the
//   CTA exited, or with a warp collective still incomplete, is reported (divergent barrier).
// * Warp collectives (shuffles, ldmatrix, mma.sync) deposit each lane's operands; the last lane of
//   the warp to arrive computes the instruction for all 32 lanes (fragment layouts of the PTX ISA)
//   and releases the others. All 32 lanes must arrive at the same instruction (mask 0xffffffff).
// * cp.async.cg 16: the source is read and checked at issue; the 16 bytes land in shared memory
//   only when a cp.async.wait_group of the issuing thread retires the group that holds the copy
//   (the latest moment the PTX ISA allows), so a wait that is too shallow leaves stale data.
// * Memory checks (while a kernel runs): the kernel TUs are compiled with -fsanitize=thread, whose
//   instrumentation calls __tsan_read*/__tsan_write* (defined here, no TSan runtime) before every
//   load and store. An address on the running fiber's own stack is a local; an address in this
//   module's static data is __shared__ memory (csrc kernels have no other static data); anything
//   else must lie inside a tensor the Python side registered for this call (register_buffer), or
//   the launch fails with "out-of-bounds global access".
// * Dynamic shared memory: one buffer (g_dyn_shared, in the same static data, so it is shared memory
//   to the checks) of which a launch may use its third launch argument's bytes; an access past them
//   is an error. Above 48 KiB a launch fails (cudaErrorInvalidValue, as on a GPU) unless the
//   kernel's cudaFuncAttributeMaxDynamicSharedMemorySize was set at least that high, and
//   cudaFuncSetAttribute refuses values above the device's opt-in limit
//   (cudaDevAttrMaxSharedMemoryPerBlockOptin; rk_host_configure_device sets the device posed as).
// * Shared-memory race detector, per 4-byte word of shared memory and per barrier interval: a word
//   written by one thread and read or written by another in the same interval, an access to a
//   word an in-flight cp.async targets, and a read of a word never written in this CTA are errors.
// Any error stops the launch: the first message becomes the sticky launch error, which csrc's
// rk::check_launch turns into rk::CudaError (RuntimeError in Python) naming the kernel.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "rk_host.h"
#include "rk_host_ptx.h"

// ---- context switching: a few instructions on x86-64 (callee-saved registers, MXCSR and the x87
// control word, then the stack pointer), ucontext elsewhere (a signal-mask system call per switch).
#if defined(__x86_64__)
extern "C" void rk_host_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl rk_host_switch
  .hidden rk_host_switch
  .type rk_host_switch,@function
rk_host_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rk_host_switch,.-rk_host_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
struct Context {
  void* sp = nullptr;
};
// A fresh context that starts in fn() on the stack [lo, hi) (fn never returns).
inline void make_context(Context& c, char* lo, char* hi, void (*fn)()) {
  (void)lo;
  uintptr_t top = reinterpret_cast<uintptr_t>(hi) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = 0;                                  // fake return address of fn
  s[-2] = reinterpret_cast<uint64_t>(fn);     // popped by ret
  for (int i = 3; i <= 8; ++i) s[-i] = 0;     // rbp rbx r12 r13 r14 r15
  s[-9] = 0x1f80ull | (0x037full << 32);      // MXCSR default, x87 control word default
  c.sp = &s[-9];
}
inline void switch_context(Context& from, Context& to) { rk_host_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& c, char* lo, char* hi, void (*fn)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = static_cast<size_t>(hi - lo);
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

namespace rk_host {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum State : int { kRunnable, kAtBarrier, kAtWarp, kDone };
enum Coll : int { kNone = 0, kShfl = 1, kLdsm = 2, kMma = 3 };

struct Copy {
  uint32_t dst;
  unsigned char data[16];
};

struct Fiber {
  Context ctx;
  int tid = 0;
  int state = kDone;
  bool checking = false;
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
  uint3 tidx{0, 0, 0};
  std::vector<Copy> pending;               // issued, not yet committed
  std::deque<std::vector<Copy>> groups;    // committed groups, oldest first
};

struct WarpSlot {
  int arrived = 0;
  int kind[32];
  int sub[32];
  const void* in[32];
  void* out[32];
};

// One shadow record per 4-byte word of shared memory.
struct Shadow {
  uint32_t gen;    // CTA generation the rest refers to (stale = fresh word)
  uint32_t epoch;  // barrier interval of writer/reader
  int16_t writer;  // thread that wrote it in `epoch`, -1 none
  int16_t reader;  // thread that read it in `epoch`, -1 none, -2 several
  uint16_t inflight;
  uint16_t written;  // written at least once in this CTA
};

std::recursive_mutex g_launch_mutex;  // one launch at a time (the bindings release the GIL)

// ---- run state
Fiber g_fibers[kMaxThreads];
char* g_stacks = nullptr;
Context g_sched;
Fiber* g_cur = nullptr;
bool g_checking = false;  // == g_cur && g_cur->checking, read on every instrumented access
int g_nthreads = 0;
dim3 g_block, g_grid;
uint3 g_bidx{0, 0, 0};
void (*g_entry)(void*) = nullptr;
void* g_entry_ctx = nullptr;
std::deque<int> g_queue;
WarpSlot g_warps[kMaxThreads / 32];
uint32_t g_gen = 0, g_epoch = 0;
bool g_abort = false;
std::string g_error;       // first error of the current launch
std::string g_last_error;  // sticky error returned by cudaGetLastError
cudaError_t g_last_code = cudaSuccess;
const char* g_kernel = "";

// ---- configuration and registered global buffers (Python, through ctypes)
int g_sm_count = 2;
unsigned g_cta_order_seed = 0;  // 0: blockIdx order; else a permutation (rk_host_configure_order)
int g_blocks_per_sm = 2;
int g_cc_major = 8, g_cc_minor = 0;  // the device posed as: A100 (sm_80) by default
int g_smem_optin = 163 * 1024;       // its opt-in shared memory per block
std::string g_launch_log;            // names of the kernels launched since the last take (Python)

// ---- dynamic shared memory (RK_DYNAMIC_SHARED): the largest opt-in of any GPU (227 KiB)
constexpr size_t kMaxDynShared = 227 * 1024;
constexpr size_t kStaticSmemLimit = 48 * 1024;  // dynamic bytes above it need the opt-in attribute
alignas(128) unsigned char g_dyn_shared[kMaxDynShared];
size_t g_dyn_bytes = 0;  // of the running launch
struct FuncAttr {
  const void* func;
  int max_dynamic_smem;
};
std::vector<FuncAttr> g_func_attrs;
struct Range {
  uintptr_t lo, hi;
};
std::vector<Range> g_buffers;

// ---- shared memory = this module's writable static data
uintptr_t g_shared_lo = 0, g_shared_hi = 0;
Shadow* g_shadow = nullptr;

int find_rw_segment(struct dl_phdr_info* info, size_t, void* data) {
  const uintptr_t probe = reinterpret_cast<uintptr_t>(data);
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (probe >= lo && probe < hi) mine = true;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W)) {
      g_shared_lo = info->dlpi_addr + ph.p_vaddr;
      g_shared_hi = g_shared_lo + ph.p_memsz;
    }
  }
  return 1;
}

int g_probe_static = 0;  // lives in this module's writable segment

void init_once() {
  if (g_shadow) return;
  dl_iterate_phdr(find_rw_segment, &g_probe_static);
  if (!g_shared_hi) {
    std::fprintf(stderr, "rk host runner: cannot find the module's writable segment\n");
    std::abort();
  }
  g_shared_lo &= ~uintptr_t(15);
  const size_t words = (g_shared_hi - g_shared_lo + 3) / 4;
  void* sh = mmap(nullptr, words * sizeof(Shadow), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                  -1, 0);
  void* st = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (sh == MAP_FAILED || st == MAP_FAILED) {
    std::fprintf(stderr, "rk host runner: mmap failed\n");
    std::abort();
  }
  g_shadow = static_cast<Shadow*>(sh);
  g_stacks = static_cast<char*>(st);
}

// ---- errors
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string where(int tid) {
  const Fiber& f = g_fibers[tid];
  return fmt("thread (%u,%u,%u) [tid %d, warp %d, lane %d] of block (%u,%u,%u)", f.tidx.x, f.tidx.y, f.tidx.z, tid,
             tid / 32, tid % 32, g_bidx.x, g_bidx.y, g_bidx.z);
}

// Record the error and stop the launch: from a fiber, switch to the scheduler for good.
[[noreturn]] void fail(const std::string& msg) {
  if (g_error.empty()) g_error = msg;
  g_abort = true;
  if (g_cur) {
    Fiber* f = g_cur;
    f->checking = false;
    g_checking = false;
    switch_context(f->ctx, g_sched);
  }
  std::fprintf(stderr, "rk host runner: fatal outside a fiber: %s\n", msg.c_str());
  std::abort();
}

void yield() {
  Fiber* f = g_cur;
  g_checking = false;
  switch_context(f->ctx, g_sched);
  // resumed by the scheduler (which set g_cur)
  g_checking = f->checking;
}

// ---- shared-memory shadow
inline bool in_shared(uintptr_t a, size_t n) { return a >= g_shared_lo && a + n <= g_shared_hi; }

inline Shadow& word(uintptr_t a) {
  Shadow& s = g_shadow[(a - g_shared_lo) >> 2];
  if (s.gen != g_gen) s = Shadow{g_gen, g_epoch, -1, -1, 0, 0};
  if (s.epoch != g_epoch) {
    s.epoch = g_epoch;
    s.writer = -1;
    s.reader = -1;
  }
  return s;
}

std::string shared_name(uintptr_t a) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(a), &info) && info.dli_sname)
    return fmt("%s+%ld", info.dli_sname, static_cast<long>(a - reinterpret_cast<uintptr_t>(info.dli_saddr)));
  return fmt("shared+0x%lx", static_cast<unsigned long>(a - g_shared_lo));
}

// An access by thread `tid` (write or read) of [a, a+n) in shared memory.
void shared_access(uintptr_t a, size_t n, bool write, int tid, const char* what) {
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(g_dyn_shared);
  if (a + n > dyn && a < dyn + kMaxDynShared && a + n > dyn + g_dyn_bytes)
    fail(fmt("%s of dynamic shared memory [%lu, %lu) by %s: beyond the launch's %zu bytes", what,
             static_cast<unsigned long>(a - dyn), static_cast<unsigned long>(a + n - dyn), where(tid).c_str(),
             g_dyn_bytes));
  for (uintptr_t w = a & ~uintptr_t(3); w < a + n; w += 4) {
    Shadow& s = word(w);
    if (s.inflight)
      fail(fmt("shared-memory race: %s of %s by %s while a cp.async targeting it is in flight (not yet retired by "
               "cp.async.wait_group)", what, shared_name(w).c_str(), where(tid).c_str()));
    if (write) {
      if (s.writer >= 0 && s.writer != tid)
        fail(fmt("shared-memory race: %s of %s by %s; %s wrote it in the same barrier interval", what,
                 shared_name(w).c_str(), where(tid).c_str(), where(s.writer).c_str()));
      if (s.reader == -2 || (s.reader >= 0 && s.reader != tid))
        fail(fmt("shared-memory race: %s of %s by %s; %s read it in the same barrier interval", what,
                 shared_name(w).c_str(), where(tid).c_str(),
                 s.reader == -2 ? "several threads" : where(s.reader).c_str()));
      s.writer = static_cast<int16_t>(tid);
      s.written = 1;
    } else {
      if (!s.written)
        fail(fmt("read of uninitialised shared memory: %s of %s by %s (never written in this CTA)", what,
                 shared_name(w).c_str(), where(tid).c_str()));
      if (s.writer >= 0 && s.writer != tid)
        fail(fmt("shared-memory race: %s of %s by %s; %s wrote it in the same barrier interval", what,
                 shared_name(w).c_str(), where(tid).c_str(), where(s.writer).c_str()));
      s.reader = (s.reader == -1 || s.reader == tid) ? static_cast<int16_t>(tid) : int16_t(-2);
    }
  }
}

void check_global(uintptr_t a, size_t n, bool write, int tid) {
  for (const Range& r : g_buffers)
    if (a >= r.lo && a + n <= r.hi) return;
  const Fiber& f = g_fibers[tid];
  fail(fmt("out-of-bounds global access: %s of %zu bytes at 0x%lx by %s is inside no tensor passed to the kernel "
           "(%zu tensors; shared memory [0x%lx, 0x%lx), this thread's stack [%p, %p))",
           write ? "write" : "read", n, static_cast<unsigned long>(a), where(tid).c_str(), g_buffers.size(),
           static_cast<unsigned long>(g_shared_lo), static_cast<unsigned long>(g_shared_hi),
           static_cast<void*>(f.stack_lo), static_cast<void*>(f.stack_hi)));
}

// Every instrumented load/store of kernel code while a kernel runs.
inline void on_access(const void* p, size_t n, bool write) {
  Fiber* f = g_cur;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a >= reinterpret_cast<uintptr_t>(f->stack_lo) && a + n <= reinterpret_cast<uintptr_t>(f->stack_hi)) return;
  if (in_shared(a, n)) {
    shared_access(a, n, write, f->tid, write ? "store" : "load");
    return;
  }
  check_global(a, n, write, f->tid);
}

// ---- fibers and the scheduler
void trampoline() {
  Fiber* f = g_cur;
  g_checking = false;
  g_entry(g_entry_ctx);
  f->checking = false;
  g_checking = false;
  f->state = kDone;
  for (auto& g : f->groups)  // copies never waited for: they never land (their shared memory is gone)
    for (const Copy& c : g) --word(g_shared_lo + c.dst).inflight;
  for (const Copy& c : f->pending) --word(g_shared_lo + c.dst).inflight;
  f->groups.clear();
  f->pending.clear();
  switch_context(f->ctx, g_sched);
}

void run_cta() {
  ++g_gen;
  ++g_epoch;
  g_queue.clear();
  for (auto& w : g_warps) w.arrived = 0;
  for (int t = 0; t < g_nthreads; ++t) {
    Fiber& f = g_fibers[t];
    f.tid = t;
    f.state = kRunnable;
    f.checking = false;
    f.stack_lo = g_stacks + static_cast<size_t>(t) * kStackBytes;
    f.stack_hi = f.stack_lo + kStackBytes;
    f.tidx = uint3{t % g_block.x, (t / g_block.x) % g_block.y, t / (g_block.x * g_block.y)};
    f.pending.clear();
    f.groups.clear();
    make_context(f.ctx, f.stack_lo, f.stack_hi, trampoline);
    g_queue.push_back(t);
  }
  while (!g_abort) {
    if (g_queue.empty()) {
      int done = 0, barrier = 0, warp = -1;
      for (int t = 0; t < g_nthreads; ++t) {
        const int s = g_fibers[t].state;
        done += s == kDone;
        barrier += s == kAtBarrier;
        if (s == kAtWarp && warp < 0) warp = t;
      }
      if (done == g_nthreads) return;
      if (warp >= 0) {
        g_error = fmt("divergent warp collective: %s waits at a shuffle/ldmatrix/mma that lanes of its warp never "
                      "reach (%d threads at __syncthreads, %d exited)", where(warp).c_str(), barrier, done);
        g_abort = true;
        return;
      }
      if (done > 0) {
        g_error = fmt("divergent __syncthreads in block (%u,%u,%u): %d threads wait at it, %d threads of the block "
                      "exited", g_bidx.x, g_bidx.y, g_bidx.z, barrier, done);
        g_abort = true;
        return;
      }
      ++g_epoch;  // every thread arrived: the barrier completes
      for (int t = 0; t < g_nthreads; ++t) {
        g_fibers[t].state = kRunnable;
        g_queue.push_back(t);
      }
      continue;
    }
    const int t = g_queue.front();
    g_queue.pop_front();
    Fiber& f = g_fibers[t];
    g_cur = &f;
    g_checking = f.checking;
    switch_context(g_sched, f.ctx);
    g_cur = nullptr;
    g_checking = false;
  }
}

Fiber& current(const char* what) {
  if (!g_cur) {
    std::fprintf(stderr, "rk host runner: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_cur;
}

// ---- warp collectives
void compute_shfl(WarpSlot& w) {
  uint64_t in[32];
  for (int l = 0; l < 32; ++l) in[l] = *static_cast<const uint64_t*>(w.in[l]);
  for (int l = 0; l < 32; ++l) {
    const int mode = w.sub[l] & 3, arg = w.sub[l] >> 2;
    int src = l;
    if (mode == 0) src = l ^ arg;
    if (mode == 1) src = l + arg < 32 ? l + arg : l;
    if (mode == 2) src = l - arg >= 0 ? l - arg : l;
    if (mode == 3) src = arg & 31;
    if (src < 0 || src > 31) src = l;
    *static_cast<uint64_t*>(w.out[l]) = in[src];
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of matrix i
// (16 bytes per row); lane l receives in register i the 32 bits at row l/4, b16 columns
// 2*(l%4), 2*(l%4)+1 of matrix i (PTX ISA, "Matrix fragments for ldmatrix"). With .trans (trans)
// each matrix is transposed: register i holds the b16 elements at rows 2*(l%4) (low half) and
// 2*(l%4)+1 (high half) of column l/4.
void compute_ldsm(WarpSlot& w, int warp, bool trans) {
  unsigned char rows[4][8][16];
  for (int l = 0; l < 32; ++l) {
    const uint32_t addr = *static_cast<const uint32_t*>(w.in[l]);
    const int tid = warp * 32 + l;
    if (addr % 16 != 0) fail(fmt("ldmatrix: row address 0x%x of %s is not 16-byte aligned", addr, where(tid).c_str()));
    const uintptr_t a = g_shared_lo + addr;
    if (!in_shared(a, 16))
      fail(fmt("ldmatrix: row address 0x%x of %s is outside shared memory", addr, where(tid).c_str()));
    shared_access(a, 16, false, tid, "ldmatrix row read");
    std::memcpy(rows[l / 8][l % 8], reinterpret_cast<const void*>(a), 16);
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<uint32_t*>(w.out[l]);
    for (int i = 0; i < 4; ++i) {
      if (trans) {
        uint16_t lo, hi;
        std::memcpy(&lo, &rows[i][2 * (l % 4)][2 * (l / 4)], 2);
        std::memcpy(&hi, &rows[i][2 * (l % 4) + 1][2 * (l / 4)], 2);
        r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      } else {
        std::memcpy(&r[i], &rows[i][l / 4][4 * (l % 4)], 4);
      }
    }
  }
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

double f16_value(uint16_t b) { return __half2float(__half{b}); }
double bf16_value(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }
double tf32_value(uint32_t b) {  // a .tf32 operand: only the 19 high bits are read
  const float f = __uint_as_float(b);
  if (std::isnan(f)) return f;
  return __uint_as_float(b & 0xffffe000u);
}

// mma.sync.aligned.{m16n8k16 f16/bf16, m16n8k8 tf32}.row.col.f32 (PTX ISA, "Matrix fragments for
// mma.m16n8k16 / mma.m16n8k8"): groupID g = lane >> 2, threadID_in_group t = lane % 4.
//   m16n8k16 A (16x16): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..)
//            B (16x8):  reg0 = (k = 2t..2t+1, n = g), reg1 = (k = 2t+8..2t+9, n = g); low half = lower index
//   m16n8k8  A (16x8 tf32): a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)
//            B (8x8 tf32):  b0 = (k = t, n = g), b1 = (k = t+4, n = g)
//   C/D (16x8 f32): c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
// Products are exact and summed in double, then rounded once to float (the hardware's fp32
// accumulation order is unspecified; the parity tests' tolerances cover either).
void compute_mma(WarpSlot& w, int kind) {
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  const int K = kind == kMmaTF32 ? 8 : 16;
  auto h = [kind](uint32_t r, int half) {
    const uint16_t b = static_cast<uint16_t>(half ? r >> 16 : r & 0xffffu);
    return kind == kMmaF16 ? f16_value(b) : bf16_value(b);
  };
  for (int l = 0; l < 32; ++l) {
    const MmaIn& in = *static_cast<const MmaIn*>(w.in[l]);
    const int g = l >> 2, t = l & 3;
    if (kind == kMmaTF32) {
      A[g][t] = tf32_value(in.a[0]);
      A[g + 8][t] = tf32_value(in.a[1]);
      A[g][t + 4] = tf32_value(in.a[2]);
      A[g + 8][t + 4] = tf32_value(in.a[3]);
      B[t][g] = tf32_value(in.b[0]);
      B[t + 4][g] = tf32_value(in.b[1]);
    } else {
      for (int j = 0; j < 2; ++j) {
        A[g][2 * t + j] = h(in.a[0], j);
        A[g + 8][2 * t + j] = h(in.a[1], j);
        A[g][2 * t + 8 + j] = h(in.a[2], j);
        A[g + 8][2 * t + 8 + j] = h(in.a[3], j);
        B[2 * t + j][g] = h(in.b[0], j);
        B[2 * t + 8 + j][g] = h(in.b[1], j);
      }
    }
    C[g][2 * t] = in.c[0];
    C[g][2 * t + 1] = in.c[1];
    C[g + 8][2 * t] = in.c[2];
    C[g + 8][2 * t + 1] = in.c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double s = C[i][j];
      for (int k = 0; k < K; ++k) s += A[i][k] * B[k][j];
      D[i][j] = static_cast<float>(s);
    }
  for (int l = 0; l < 32; ++l) {
    float* d = static_cast<float*>(w.out[l]);
    const int g = l >> 2, t = l & 3;
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
}

const char* coll_name(int kind) {
  switch (kind) {
    case kShfl: return "shuffle";
    case kLdsm: return "ldmatrix";
    case kMma: return "mma.sync";
  }
  return "?";
}

// Lane arrives at a warp collective; returns once all 32 lanes arrived and it was computed.
void collective(int kind, int sub, const void* in, void* out) {
  Fiber& f = current(coll_name(kind));
  const int warp = f.tid / 32, lane = f.tid % 32;
  if ((warp + 1) * 32 > g_nthreads)
    fail(fmt("%s in a partial warp (block of %d threads) by %s", coll_name(kind), g_nthreads, where(f.tid).c_str()));
  WarpSlot& w = g_warps[warp];
  w.kind[lane] = kind;
  w.sub[lane] = sub;
  w.in[lane] = in;
  w.out[lane] = out;
  if (++w.arrived < 32) {
    f.state = kAtWarp;
    yield();
    return;
  }
  for (int l = 0; l < 32; ++l)
    if (w.kind[l] != kind || (kind != kShfl && w.sub[l] != sub))
      fail(fmt("divergent warp collective: lane %d of warp %d of block (%u,%u,%u) is at %s, lane %d at %s", l, warp,
               g_bidx.x, g_bidx.y, g_bidx.z, coll_name(w.kind[l]), lane, coll_name(kind)));
  if (kind == kShfl) compute_shfl(w);
  if (kind == kLdsm) compute_ldsm(w, warp, sub == 1);
  if (kind == kMma) compute_mma(w, sub);
  w.arrived = 0;
  for (int l = 0; l < 32; ++l) {
    Fiber& o = g_fibers[warp * 32 + l];
    if (&o != &f) {
      o.state = kRunnable;
      g_queue.push_back(o.tid);
    }
  }
}

void land(Fiber& f, const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    const uintptr_t a = g_shared_lo + c.dst;
    for (int i = 0; i < 4; ++i) --word(a + 4 * i).inflight;
    shared_access(a, 16, true, f.tid, "cp.async landing");
    std::memcpy(reinterpret_cast<void*>(a), c.data, 16);
  }
}

}  // namespace

// ---- built-ins -------------------------------------------------------------------------------
uint3 thread_idx() { return current("threadIdx").tidx; }
uint3 block_idx() { return g_bidx; }
dim3 block_dim() { return g_block; }
dim3 grid_dim() { return g_grid; }
int sm_count() { return g_sm_count; }
unsigned char* dynamic_shared() {
  current("dynamic shared memory");
  return g_dyn_shared;
}
int device_attribute(cudaDeviceAttr a) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: return g_cc_major;
    case cudaDevAttrComputeCapabilityMinor: return g_cc_minor;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return g_smem_optin;
    case cudaDevAttrMultiProcessorCount: return g_sm_count;
  }
  return 0;
}
cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > g_smem_optin) {
    if (g_last_code == cudaSuccess) {
      g_last_code = cudaErrorInvalidValue;
      g_last_error = fmt("rk host runner: cudaFuncSetAttribute(attribute %d, %d): above the device's opt-in limit %d "
                         "(or not modelled)", static_cast<int>(attr), value, g_smem_optin);
    }
    return cudaErrorInvalidValue;
  }
  for (FuncAttr& f : g_func_attrs)
    if (f.func == func) {
      f.max_dynamic_smem = value;
      return cudaSuccess;
    }
  g_func_attrs.push_back({func, value});
  return cudaSuccess;
}
int blocks_per_sm() { return g_blocks_per_sm; }

void syncthreads() {
  Fiber& f = current("__syncthreads");
  f.state = kAtBarrier;
  yield();
}

uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg) {
  Fiber& f = current("__shfl_*_sync");
  if (mask != 0xffffffffu) fail(fmt("shuffle with mask 0x%x by %s: only full-warp masks are modelled", mask,
                                    where(f.tid).c_str()));
  uint64_t out = 0;
  collective(kShfl, mode | (arg << 2), &bits, &out);
  return out;
}

void trap(const char* what) {
  if (g_cur) fail(fmt("%s by %s", what, where(g_cur->tid).c_str()));
  std::fprintf(stderr, "rk host runner: %s outside a kernel\n", what);
  std::abort();
}

uint32_t cvta_shared(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!in_shared(a, 1)) fail(fmt("__cvta_generic_to_shared of %p, which is not shared memory", p));
  return static_cast<uint32_t>(a - g_shared_lo);
}

void kernel_begin() {
  Fiber& f = current("kernel_begin");
  f.checking = true;
  g_checking = true;
}
void kernel_end() {
  Fiber& f = current("kernel_end");
  f.checking = false;
  g_checking = false;
}

int func_max_dynamic_smem(const void* func) {
  for (const FuncAttr& f : g_func_attrs)
    if (f.func == func) return f.max_dynamic_smem;
  return static_cast<int>(kStaticSmemLimit);
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const void* func,
              void (*entry)(void*), void* ctx) {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  init_once();
  if (g_launch_log.size() > (1u << 20)) g_launch_log.clear();  // never taken: bounded
  g_launch_log += kernel;
  g_launch_log += '\n';
  const int allowed = func_max_dynamic_smem(func);
  if (dynamic_smem > static_cast<size_t>(allowed) || dynamic_smem > static_cast<size_t>(g_smem_optin)) {
    if (g_last_code == cudaSuccess) {
      g_last_code = cudaErrorInvalidValue;
      g_last_error = fmt("rk host runner: launch of %s with %zu bytes of dynamic shared memory: above the kernel's "
                         "cudaFuncAttributeMaxDynamicSharedMemorySize (%d) or the device's opt-in limit (%d)",
                         kernel, dynamic_smem, allowed, g_smem_optin);
    }
    return;
  }
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    if (g_last_code == cudaSuccess) {
      g_last_code = cudaErrorInvalidValue;
      g_last_error = fmt("invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y, grid.z,
                         block.x, block.y, block.z);
    }
    return;
  }
  g_kernel = kernel;
  g_dyn_bytes = dynamic_smem;
  g_grid = grid;
  g_block = block;
  g_nthreads = static_cast<int>(nthreads);
  g_entry = entry;
  g_entry_ctx = ctx;
  g_abort = false;
  g_error.clear();
  const uint64_t ctas = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (g_cta_order_seed != 0) {  // Fisher-Yates with xorshift64*, seeded: the same permutation every run
    order.resize(ctas);
    for (uint64_t i = 0; i < ctas; ++i) order[i] = i;
    uint64_t r = 0x9E3779B97F4A7C15ull * g_cta_order_seed;
    for (uint64_t i = ctas; i > 1; --i) {
      r ^= r >> 12;
      r ^= r << 25;
      r ^= r >> 27;
      const uint64_t j = (r * 0x2545F4914F6CDD1Dull) % i;
      std::swap(order[i - 1], order[j]);
    }
  }
  for (uint64_t i = 0; i < ctas && !g_abort; ++i) {
    const uint64_t b = order.empty() ? i : order[i];
    g_bidx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                   static_cast<unsigned>(b / grid.x / grid.y)};
    run_cta();
  }
  if (g_abort && g_last_code == cudaSuccess) {
    g_last_code = cudaErrorLaunchFailure;
    g_last_error = "rk host runner: " + g_error + " [in " + kernel + "]";
  }
  g_abort = false;
}

cudaError_t take_error() {
  const cudaError_t e = g_last_code;
  g_last_code = cudaSuccess;
  return e;
}
cudaError_t peek_error() { return g_last_code; }
const char* error_string(cudaError_t e) {
  static thread_local std::string s;
  s = e == cudaSuccess ? "no error" : g_last_error;
  return s.c_str();
}

// ---- PTX instructions ------------------------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies src_bytes (0..16) bytes and
// zero-fills the rest of the 16; both addresses 16-byte aligned.
void cp_async_cg16(uint32_t dst, const void* src, int src_bytes) {
  Fiber& f = current("cp.async");
  if (dst % 16) fail(fmt("cp.async: shared destination 0x%x of %s is not 16-byte aligned", dst, where(f.tid).c_str()));
  if (src_bytes < 0 || src_bytes > 16)
    fail(fmt("cp.async: src-size %d of %s is not in [0, 16]", src_bytes, where(f.tid).c_str()));
  const uintptr_t a = g_shared_lo + dst;
  if (!in_shared(a, 16))
    fail(fmt("cp.async: destination 0x%x of %s is outside shared memory", dst, where(f.tid).c_str()));
  Copy c{dst, {}};
  if (src_bytes > 0) {
    const uintptr_t s = reinterpret_cast<uintptr_t>(src);
    if (s % 16) fail(fmt("cp.async.cg 16: global source %p of %s is not 16-byte aligned", src, where(f.tid).c_str()));
    check_global(s, static_cast<size_t>(src_bytes), false, f.tid);
    std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
  }
  // the copy may land at any time until its group is waited for: it conflicts like a write
  for (int i = 0; i < 4; ++i) {
    Shadow& s = word(a + 4 * i);
    if (s.inflight)
      fail(fmt("shared-memory race: cp.async by %s targets %s, which an earlier cp.async still in flight targets",
               where(f.tid).c_str(), shared_name(a + 4 * i).c_str()));
  }
  shared_access(a, 16, true, f.tid, "cp.async (issue)");
  for (int i = 0; i < 4; ++i) ++word(a + 4 * i).inflight;
  f.pending.push_back(c);
}

void cp_async_commit_group() {
  Fiber& f = current("cp.async.commit_group");
  f.groups.push_back(std::move(f.pending));
  f.pending.clear();
}

// cp.async.wait_group n: all but the n most recent committed groups of this thread are complete.
void cp_async_wait_group(int n) {
  Fiber& f = current("cp.async.wait_group");
  while (static_cast<int>(f.groups.size()) > n) {
    land(f, f.groups.front());
    f.groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { collective(kLdsm, 0, &addr, r); }
void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { collective(kLdsm, 1, &addr, r); }

void mma_sync(int kind, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  collective(kMma, kind, &in, d);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits; the result is an
// fp32 bit pattern whose 13 low bits are zero. NaN stays NaN.
uint32_t cvt_rna_tf32(float x) {
  const uint32_t b = __float_as_uint(x);
  if (std::isnan(x)) return 0x7fffffffu;
  if (std::isinf(x)) return b;
  return (b + 0x1000u) & 0xffffe000u;  // sign-magnitude: adding half an ulp rounds ties away
}

}  // namespace rk_host

// ---- ThreadSanitizer instrumentation entry points (no TSan runtime is linked) ------------------
#define RK_TSAN_RW(n)                                                                          \
  extern "C" void __tsan_read##n(void* p) {                                                  \
    if (rk_host::g_checking) rk_host::on_access(p, n, false);                                \
  }                                                                                          \
  extern "C" void __tsan_write##n(void* p) {                                                 \
    if (rk_host::g_checking) rk_host::on_access(p, n, true);                                 \
  }                                                                                          \
  extern "C" void __tsan_unaligned_read##n(void* p) {                                        \
    if (rk_host::g_checking) rk_host::on_access(p, n, false);                                \
  }                                                                                          \
  extern "C" void __tsan_unaligned_write##n(void* p) {                                       \
    if (rk_host::g_checking) rk_host::on_access(p, n, true);                                 \
  }                                                                                          \
  extern "C" void __tsan_volatile_read##n(void* p) {                                         \
    if (rk_host::g_checking) rk_host::on_access(p, n, false);                                \
  }                                                                                          \
  extern "C" void __tsan_volatile_write##n(void* p) {                                        \
    if (rk_host::g_checking) rk_host::on_access(p, n, true);                                 \
  }
RK_TSAN_RW(1)
RK_TSAN_RW(2)
RK_TSAN_RW(4)
RK_TSAN_RW(8)
RK_TSAN_RW(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  if (rk_host::g_checking && n) rk_host::on_access(p, n, false);
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  if (rk_host::g_checking && n) rk_host::on_access(p, n, true);
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

// ---- configuration for Python (ctypes) --------------------------------------------------------
extern "C" void rk_host_register_buffer(uintptr_t p, uint64_t n) {
  if (n) rk_host::g_buffers.push_back({p, p + n});
}
extern "C" void rk_host_clear_buffers() { rk_host::g_buffers.clear(); }
// The order CTAs run in: 0 = blockIdx order (x fastest), else a permutation fixed by the seed.
extern "C" void rk_host_configure_order(unsigned seed) {
  std::lock_guard<std::recursive_mutex> lock(rk_host::g_launch_mutex);
  rk_host::g_cta_order_seed = seed;
}
extern "C" void rk_host_configure(int sm_count, int blocks_per_sm) {
  rk_host::g_sm_count = sm_count;
  rk_host::g_blocks_per_sm = blocks_per_sm;
}
// The device posed as (compute capability, opt-in shared memory per block). The kernels'
// cudaFuncSetAttribute values stay (csrc opts in once per kernel and device); a launch above the new
// opt-in limit fails all the same.
extern "C" void rk_host_configure_device(int major, int minor, int smem_optin) {
  std::lock_guard<std::recursive_mutex> lock(rk_host::g_launch_mutex);
  rk_host::g_cc_major = major;
  rk_host::g_cc_minor = minor;
  rk_host::g_smem_optin = smem_optin;
}
// The kernels launched since the last call, one name per line (then forgotten).
extern "C" const char* rk_host_take_launches() {
  static std::string taken;
  std::lock_guard<std::recursive_mutex> lock(rk_host::g_launch_mutex);
  taken.swap(rk_host::g_launch_log);
  rk_host::g_launch_log.clear();
  return taken.c_str();
}

// Atomics in the (host-side) code of the kernel TUs: plain sequentially consistent operations.
#define RK_TSAN_ATOMIC(bits, T)                                                                      \
  extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) {                               \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                  \
  extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                            \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                  \
  extern "C" T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                           \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                               \
  }                                                                                                  \
  extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                            \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                              \
  }                                                                                                  \
  extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) { \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);          \
  }
RK_TSAN_ATOMIC(8, uint8_t)
RK_TSAN_ATOMIC(16, uint16_t)
RK_TSAN_ATOMIC(32, uint32_t)
RK_TSAN_ATOMIC(64, uint64_t)
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
