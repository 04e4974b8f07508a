// floor: the fastest a server can answer lg on this machine, as a yardstick for the
// supervisor's figures (BENCHMARKS.md). One thread, blocking calls, no parsing: accept, read
// until the first '\n', write a constant reply, close. It serves nothing else.
//
// usage: floor PORT [REPLY_FILE]   (default reply: {"status":"ok"}\n, as ping's)
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: floor PORT [REPLY_FILE]\n"); return 2; }
  static char reply[1 << 20] = "{\"status\":\"ok\"}\n";
  size_t reply_len = strlen(reply);
  if (argc > 2) {
    FILE *f = fopen(argv[2], "rb");
    if (!f) { perror(argv[2]); return 2; }
    reply_len = fread(reply, 1, sizeof reply, f);
    fclose(f);
  }
  int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1])),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1024) < 0) { perror("listen"); return 2; }
  char buf[4096];
  for (;;) {
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    size_t got = 0;
    while (got < sizeof buf) {
      ssize_t n = read(c, buf + got, sizeof buf - got);
      if (n <= 0) break;
      if (memchr(buf + got, '\n', (size_t)n)) break;
      got += (size_t)n;
    }
    for (size_t off = 0; off < reply_len;) {
      ssize_t n = write(c, reply + off, reply_len - off);
      if (n <= 0) break;
      off += (size_t)n;
    }
    close(c);
  }
}
