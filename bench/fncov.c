// fncov: which functions of an executable run, in the order they first run.
//
// Used by bench/orderfile.sh to write packaging/hot-functions.txt, the link order that keeps
// the code a worker and the supervisor run together on as few pages as possible (see
// BENCHMARKS.md, "Idle memory").
//
// usage: fncov SYMBOLS OUT SECONDS -- PROGRAM [ARGS...]
//   SYMBOLS  lines "HEXADDR NAME": function entry addresses in PROGRAM's ELF file (PIE
//            addresses, as `nm` prints them) and their (mangled) names
//   OUT      gets the names of the functions that ran, one per line, in first-run order
//   SECONDS  after this long PROGRAM gets SIGTERM (0: let it exit by itself)
//
// How: PROGRAM runs under ptrace(2) with a one-shot breakpoint (int3) at every function's
// first byte. A breakpoint that traps is recorded, its byte restored and the thread resumed
// at the same address, so each function costs one trap. Threads (clone) are traced; forked
// children are traced until they exec (code between fork and exec is PROGRAM's own), then
// released.
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct fn {
  uint64_t addr;     // entry in the file
  char *name;
  unsigned char orig; // the byte under the breakpoint
  int hit;
};

static struct fn *fns;
static size_t nfns;

static int by_addr(const void *a, const void *b) {
  uint64_t x = ((const struct fn *)a)->addr, y = ((const struct fn *)b)->addr;
  return x < y ? -1 : x > y;
}

static struct fn *find(uint64_t addr) {
  size_t lo = 0, hi = nfns;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (fns[mid].addr == addr) return &fns[mid];
    if (fns[mid].addr < addr) lo = mid + 1; else hi = mid;
  }
  return NULL;
}

static void die(const char *what) { perror(what); exit(2); }

// The address PROGRAM's file is mapped at (the mapping of file offset 0).
static uint64_t load_base(pid_t pid, const char *exe) {
  char path[64], line[4096];
  snprintf(path, sizeof path, "/proc/%d/maps", pid);
  FILE *f = fopen(path, "r");
  if (!f) die("maps");
  char real[4096];
  if (!realpath(exe, real)) die("realpath");
  uint64_t base = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long start, off;
    char file[4096] = "";
    if (sscanf(line, "%lx-%*lx %*s %lx %*s %*s %4095s", &start, &off, file) >= 2 && off == 0 &&
        strcmp(file, real) == 0) {
      base = start;
      break;
    }
  }
  fclose(f);
  if (!base) { fprintf(stderr, "fncov: %s not mapped in %d\n", real, pid); exit(2); }
  return base;
}

static int poke_byte(pid_t pid, uint64_t at, unsigned char byte, unsigned char *old) {
  uint64_t word_at = at & ~7ULL;
  errno = 0;
  long word = ptrace(PTRACE_PEEKTEXT, pid, (void *)word_at, 0);
  if (errno) return -1;
  unsigned shift = (unsigned)(at - word_at) * 8;
  if (old) *old = (unsigned char)(word >> shift);
  word = (long)(((uint64_t)word & ~(0xffULL << shift)) | ((uint64_t)byte << shift));
  return ptrace(PTRACE_POKETEXT, pid, (void *)word_at, (void *)word) < 0 ? -1 : 0;
}

int main(int argc, char **argv) {
  if (argc < 6 || strcmp(argv[4], "--") != 0) {
    fprintf(stderr, "usage: fncov SYMBOLS OUT SECONDS -- PROGRAM [ARGS...]\n");
    return 2;
  }
  FILE *syms = fopen(argv[1], "r");
  if (!syms) die(argv[1]);
  size_t cap = 1 << 16;
  fns = calloc(cap, sizeof *fns);
  char line[8192];
  while (fgets(line, sizeof line, syms)) {
    char name[8000];
    unsigned long addr;
    if (sscanf(line, "%lx %7999s", &addr, name) != 2) continue;
    if (nfns == cap) fns = realloc(fns, (cap *= 2) * sizeof *fns);
    fns[nfns++] = (struct fn){.addr = addr, .name = strdup(name)};
  }
  fclose(syms);
  qsort(fns, nfns, sizeof *fns, by_addr);
  // One breakpoint per address (aliases share the first name).
  size_t u = 0;
  for (size_t i = 0; i < nfns; i++)
    if (u == 0 || fns[u - 1].addr != fns[i].addr) fns[u++] = fns[i];
  nfns = u;
  FILE *out = fopen(argv[2], "w");
  if (!out) die(argv[2]);
  int seconds = atoi(argv[3]);

  pid_t main_pid = fork();
  if (main_pid < 0) die("fork");
  if (main_pid == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execvp(argv[5], argv + 5);
    die(argv[5]);
  }
  int st;
  if (waitpid(main_pid, &st, 0) < 0 || !WIFSTOPPED(st)) die("exec stop");
  ptrace(PTRACE_SETOPTIONS, main_pid, 0,
         (void *)(long)(PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK |
                        PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL));
  uint64_t base = load_base(main_pid, argv[5]);
  size_t armed = 0;
  for (size_t i = 0; i < nfns; i++)
    if (poke_byte(main_pid, base + fns[i].addr, 0xcc, &fns[i].orig) == 0) armed++;
  fprintf(stderr, "fncov: %zu breakpoints at base %#lx\n", armed, (unsigned long)base);
  ptrace(PTRACE_CONT, main_pid, 0, 0);

  time_t start = time(NULL);
  int termed = 0;
  size_t hits = 0;
  for (;;) {
    if (seconds > 0 && !termed && time(NULL) - start >= seconds) {
      kill(main_pid, SIGTERM);
      termed = 1;
    }
    pid_t pid = waitpid(-1, &st, __WALL | (seconds > 0 && !termed ? WNOHANG : 0));
    if (pid == 0) { usleep(20000); continue; }
    if (pid < 0) { if (errno == EINTR) continue; break; }
    if (WIFEXITED(st) || WIFSIGNALED(st)) {
      if (pid == main_pid) {
        if (WIFSIGNALED(st)) fprintf(stderr, "fncov: program killed by signal %d\n", WTERMSIG(st));
        break;
      }
      continue;
    }
    if (!WIFSTOPPED(st)) continue;
    int sig = WSTOPSIG(st), event = st >> 16;
    if (event == PTRACE_EVENT_EXEC && pid != main_pid) {
      ptrace(PTRACE_DETACH, pid, 0, 0); // a child now runs another program
      continue;
    }
    if (event) { ptrace(PTRACE_CONT, pid, 0, 0); continue; }
    if (sig == SIGTRAP) {
      struct user_regs_struct regs;
      if (ptrace(PTRACE_GETREGS, pid, 0, &regs) == 0) {
        struct fn *f = regs.rip >= base + 1 ? find(regs.rip - 1 - base) : NULL;
        if (f) {
          // (Restoring twice, when two threads trapped at once, is harmless.)
          poke_byte(pid, regs.rip - 1, f->orig, NULL);
          if (!f->hit) {
            f->hit = 1;
            hits++;
            fprintf(out, "%s\n", f->name);
          }
          regs.rip -= 1;
          ptrace(PTRACE_SETREGS, pid, 0, &regs);
          ptrace(PTRACE_CONT, pid, 0, 0);
          continue;
        }
      }
      ptrace(PTRACE_CONT, pid, 0, (void *)(long)sig);
      continue;
    }
    // New threads and children start with SIGSTOP; other signals go through.
    ptrace(PTRACE_CONT, pid, 0, (void *)(long)(sig == SIGSTOP ? 0 : sig));
  }
  fclose(out);
  fprintf(stderr, "fncov: %zu of %zu functions ran\n", hits, nfns);
  return 0;
}
