// Copied unchanged from the HydraFlow project's shared benchmark tools (tools/lg.c),
// the load generator the original's figures in BENCHMARKS.md were measured with.
// lg: tiny loopback load generator, one request per TCP connection.
// Sends PAYLOAD, reads until the peer closes (or, with -l, until first '\n'),
// records per-request latency (connect -> last byte), prints summary.
//
// usage: lg -p PORT [-c CONC] [-d SECONDS | -n REQUESTS_PER_THREAD] [-l] [-q] PAYLOAD
//   PAYLOAD supports \n and \r escapes.
//   -l : stop reading at first newline (still closes); default: read to EOF
//   -q : print only the summary line
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int g_port = 0, g_conc = 1, g_line = 0;
static double g_dur = 0;
static long g_n = 0;
static char g_payload[65536];
static size_t g_plen;

typedef struct {
  double *lat;
  long cnt, cap, errs;
  long bytes;
  char first[512];
} tres;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int one(tres *r) {
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(g_port);
  a.sin_addr.s_addr = htonl(0x7f000001);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { close(fd); return -1; }
  size_t off = 0;
  while (off < g_plen) {
    ssize_t w = write(fd, g_payload + off, g_plen - off);
    if (w <= 0) { close(fd); return -1; }
    off += w;
  }
  char buf[65536];
  long tot = 0;
  int got_nl = 0;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) { if (errno == EINTR) continue; close(fd); return -1; }
    if (n == 0) break;
    if (tot == 0 && r->first[0] == 0) {
      size_t k = n < (ssize_t)sizeof(r->first) - 1 ? (size_t)n : sizeof(r->first) - 1;
      memcpy(r->first, buf, k); r->first[k] = 0;
    }
    tot += n;
    if (g_line && memchr(buf, '\n', n)) { got_nl = 1; break; }
  }
  (void)got_nl;
  close(fd);
  r->bytes += tot;
  return tot > 0 ? 0 : -1;
}

static void *worker(void *arg) {
  tres *r = arg;
  double end = g_dur > 0 ? now() + g_dur : 0;
  long i = 0;
  for (;;) {
    if (g_dur > 0) { if (now() >= end) break; }
    else if (i >= g_n) break;
    i++;
    double t0 = now();
    int rc = one(r);
    double dt = now() - t0;
    if (rc != 0) { r->errs++; continue; }
    if (r->cnt == r->cap) { r->cap = r->cap ? r->cap * 2 : 4096; r->lat = realloc(r->lat, r->cap * sizeof(double)); }
    r->lat[r->cnt++] = dt;
  }
  return NULL;
}

static int cmpd(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void unescape(const char *s) {
  size_t j = 0;
  for (size_t i = 0; s[i] && j < sizeof g_payload - 1; i++) {
    if (s[i] == '\\' && s[i + 1] == 'n') { g_payload[j++] = '\n'; i++; }
    else if (s[i] == '\\' && s[i + 1] == 'r') { g_payload[j++] = '\r'; i++; }
    else g_payload[j++] = s[i];
  }
  g_plen = j;
}

int main(int argc, char **argv) {
  int opt, quiet = 0;
  while ((opt = getopt(argc, argv, "p:c:d:n:lq")) != -1) {
    switch (opt) {
      case 'p': g_port = atoi(optarg); break;
      case 'c': g_conc = atoi(optarg); break;
      case 'd': g_dur = atof(optarg); break;
      case 'n': g_n = atol(optarg); break;
      case 'l': g_line = 1; break;
      case 'q': quiet = 1; break;
      default: fprintf(stderr, "bad args\n"); return 2;
    }
  }
  if (optind >= argc || !g_port || (g_dur <= 0 && g_n <= 0)) {
    fprintf(stderr, "usage: lg -p PORT [-c CONC] (-d SEC | -n N) [-l] [-q] PAYLOAD\n");
    return 2;
  }
  unescape(argv[optind]);
  pthread_t th[1024];
  tres rs[1024];
  memset(rs, 0, sizeof rs);
  double t0 = now();
  for (int i = 0; i < g_conc; i++) pthread_create(&th[i], NULL, worker, &rs[i]);
  for (int i = 0; i < g_conc; i++) pthread_join(th[i], NULL);
  double el = now() - t0;
  long tot = 0, errs = 0;
  for (int i = 0; i < g_conc; i++) { tot += rs[i].cnt; errs += rs[i].errs; }
  double *all = malloc((tot ? tot : 1) * sizeof(double));
  long k = 0;
  for (int i = 0; i < g_conc; i++) { memcpy(all + k, rs[i].lat, rs[i].cnt * sizeof(double)); k += rs[i].cnt; }
  qsort(all, tot, sizeof(double), cmpd);
  double p50 = tot ? all[(long)(0.50 * (tot - 1))] : 0;
  double p90 = tot ? all[(long)(0.90 * (tot - 1))] : 0;
  double p99 = tot ? all[(long)(0.99 * (tot - 1))] : 0;
  double mx = tot ? all[tot - 1] : 0;
  double mn = tot ? all[0] : 0;
  if (!quiet && rs[0].first[0]) {
    char *nl = strchr(rs[0].first, '\n');
    if (nl && !g_line) { /* show first line only */ }
    fprintf(stderr, "first reply (truncated): %.200s\n", rs[0].first);
  }
  printf("conc=%d ok=%ld err=%ld elapsed=%.3fs rps=%.1f min_ms=%.3f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f avg_bytes=%.0f\n",
         g_conc, tot, errs, el, tot / el, mn * 1e3, p50 * 1e3, p90 * 1e3, p99 * 1e3, mx * 1e3,
         tot ? (double)(rs[0].bytes) / (rs[0].cnt ? rs[0].cnt : 1) : 0.0);
  return 0;
}
