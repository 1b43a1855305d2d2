/*
 * streamload: many EventSource or WebSocket subscribers on one epoll loop,
 * recording every message they get, for bench/streams.py.
 *
 *   streamload --transport sse|ws --proto rpl|nchan --port P --conns N
 *              (--shared NAME | --prefix P) --records FILE
 *              [--path /sub/] [--ramp K] [--max-time S]
 *
 * Each subscriber opens one connection and keeps it:
 *   rpl    GET /?identifier=CHANNEL        (Realplexor's WAIT line)
 *   nchan  GET PATH CHANNEL                 (nginx + nchan's subscriber)
 * with "Accept: text/event-stream" (sse) or a WebSocket upgrade (ws).
 * --shared puts every subscriber on one channel; --prefix gives subscriber
 * i the channel PREFIX<i>.
 *
 * Published bodies are JSON holding "m" (a message number) and "t" (the
 * publisher's CLOCK_MONOTONIC in microseconds, one clock per host). Every
 * event (sse) or text message (ws) is scanned for both, and a record
 * <uint32 subscriber, uint32 m, int64 latency ns> is kept. Pings are
 * answered, comments ignored; an event stream sent chunked is de-chunked.
 *
 * stdin, one command per line (as cometload's subscribers take them):
 *   s  print one JSON status line
 *   w  append the records kept so far to --records, then print the status
 *   q  (or end of input) write the records, print the status and exit.
 *
 * gcc -O2 -o streamload streamload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { T_SSE, T_WS };
enum { P_RPL, P_NCHAN };
enum { S_IDLE, S_CONNECTING, S_HEAD, S_STREAM, S_DEAD };

struct buffer {
    char *data;
    uint32_t len, cap;
};

struct sub {
    int fd;
    uint8_t state;
    uint8_t chunked;
    uint8_t chunk_crlf;      /* bytes of the CRLF after a chunk still to skip */
    uint32_t chunk_left;     /* data bytes of the current chunk still to come */
    struct buffer raw;       /* bytes read and not yet taken apart */
    struct buffer payload;   /* de-chunked stream bytes not yet parsed */
};

struct record {
    uint32_t sub, msg;
    int64_t latency_ns;
} __attribute__((packed));

static int transport = T_SSE, proto = P_RPL;
static int port = 0, conns = 0, ramp = 200;
static const char *shared = NULL, *prefix = NULL, *records_path = NULL, *path = "/sub/";
static double max_time = 3600;

static struct sub *subs;
static int epfd;
static int next_to_open = 0, opening = 0;
static uint64_t n_open, n_msgs, n_errors, n_closed, n_bad_status, n_pings;
static struct record *records;
static size_t n_records, records_cap;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fail(const char *what) {
    fprintf(stderr, "streamload: %s\n", what);
    exit(2);
}

static void reserve(struct buffer *b, uint32_t more) {
    /* One byte beyond the data is kept free so a parser may put a NUL there. */
    if (b->len + more + 1 <= b->cap) return;
    uint32_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more + 1) cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data) fail("out of memory");
    b->cap = cap;
}

static void consume(struct buffer *b, uint32_t n) {
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void keep_record(uint32_t sub, uint32_t msg, int64_t latency) {
    if (n_records == records_cap) {
        records_cap = records_cap ? records_cap * 2 : 65536;
        records = realloc(records, records_cap * sizeof *records);
        if (!records) fail("out of memory");
    }
    records[n_records++] = (struct record){sub, msg, latency};
}

static void write_records(void) {
    if (!records_path || !n_records) return;
    FILE *fh = fopen(records_path, "ab");
    if (!fh) fail("cannot open --records");
    fwrite(records, sizeof *records, n_records, fh);
    fclose(fh);
    n_records = 0;
}

static void print_status(void) {
    unsigned connecting = 0;
    for (int i = 0; i < conns; i++)
        if (subs[i].state == S_CONNECTING || subs[i].state == S_HEAD) connecting++;
    printf("{\"kind\":\"%s\",\"n\":%d,\"open\":%llu,\"connecting\":%u,\"msgs\":%llu,\"errors\":%llu,"
           "\"closed\":%llu,\"bad_status\":%llu,\"pings\":%llu}\n",
           transport == T_WS ? "ws" : "sse", conns, (unsigned long long)n_open, connecting,
           (unsigned long long)n_msgs, (unsigned long long)n_errors, (unsigned long long)n_closed,
           (unsigned long long)n_bad_status, (unsigned long long)n_pings);
    fflush(stdout);
}

/* The message number and publish time in one JSON text (NUL-terminated). */
static void take_message(int index, char *text) {
    char *m = strstr(text, "\"m\"");
    char *t = strstr(text, "\"t\"");
    if (!m || !t) return;
    m = strchr(m + 3, ':');
    t = strchr(t + 3, ':');
    if (!m || !t) return;
    long msg = strtol(m + 1, NULL, 10);
    long long usec = strtoll(t + 1, NULL, 10);
    keep_record((uint32_t)index, (uint32_t)msg, (int64_t)(now_ns() - (uint64_t)usec * 1000ull));
    n_msgs++;
}

static void close_sub(int index, uint8_t state) {
    struct sub *s = &subs[index];
    if (s->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
    }
    if (s->state == S_CONNECTING || s->state == S_HEAD) opening--;
    if (s->state == S_STREAM) n_open--;
    s->fd = -1;
    s->state = state;
    s->raw.len = s->payload.len = 0;
    s->chunked = s->chunk_crlf = 0;
    s->chunk_left = 0;
}

static void open_sub(int index) {
    struct sub *s = &subs[index];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) fail("socket(): out of descriptors? raise ulimit -n");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
        close(fd);
        n_errors++;
        return;
    }
    s->fd = fd;
    s->state = S_CONNECTING;
    opening++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)index};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void send_request(int index) {
    struct sub *s = &subs[index];
    char channel[128], target[256], request[1024];
    if (shared) snprintf(channel, sizeof channel, "%s", shared);
    else snprintf(channel, sizeof channel, "%s%d", prefix, index);
    if (proto == P_RPL) snprintf(target, sizeof target, "/?identifier=%s", channel);
    else snprintf(target, sizeof target, "%s%s", path, channel);
    const char *kind = transport == T_WS
        ? "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c3RyZWFtbG9hZCBrZXkgMQ==\r\n"
          "Sec-WebSocket-Version: 13\r\n"
        : "Accept: text/event-stream\r\nCache-Control: no-cache\r\n";
    int n = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n", target, kind);
    if (send(s->fd, request, (size_t)n, MSG_NOSIGNAL) != n) {
        n_errors++;
        close_sub(index, S_IDLE);
        return;
    }
    s->state = S_HEAD;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
    epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
}

/* Moves the stream bytes of s->raw into s->payload, undoing chunked framing. */
static int dechunk(struct sub *s) {
    if (!s->chunked) {
        reserve(&s->payload, s->raw.len);
        memcpy(s->payload.data + s->payload.len, s->raw.data, s->raw.len);
        s->payload.len += s->raw.len;
        s->raw.len = 0;
        return 0;
    }
    uint32_t at = 0;
    while (at < s->raw.len) {
        if (s->chunk_left) {
            uint32_t take = s->raw.len - at < s->chunk_left ? s->raw.len - at : s->chunk_left;
            reserve(&s->payload, take);
            memcpy(s->payload.data + s->payload.len, s->raw.data + at, take);
            s->payload.len += take;
            s->chunk_left -= take;
            at += take;
        } else if (s->chunk_crlf) {
            s->chunk_crlf--;
            at++;
        } else {
            char *eol = memmem(s->raw.data + at, s->raw.len - at, "\r\n", 2);
            if (!eol) break;
            unsigned long size = strtoul(s->raw.data + at, NULL, 16);
            if (size == 0) return -1;   /* the last chunk: the stream ended */
            s->chunk_left = (uint32_t)size;
            s->chunk_crlf = 2;
            at = (uint32_t)(eol - s->raw.data) + 2;
        }
    }
    consume(&s->raw, at);
    return 0;
}

static void parse_events(int index, struct sub *s) {
    struct buffer *p = &s->payload;
    uint32_t at = 0;
    for (;;) {
        char *end = memmem(p->data + at, p->len - at, "\n\n", 2);
        if (!end) break;
        *end = 0;
        if (memmem(p->data + at, (size_t)(end - (p->data + at)), "data:", 5)) take_message(index, p->data + at);
        at = (uint32_t)(end - p->data) + 2;
    }
    consume(p, at);
}

static void send_pong(struct sub *s, const char *data, uint32_t len) {
    char frame[2 + 4 + 125];
    if (len > 125) len = 125;
    frame[0] = (char)0x8A;
    frame[1] = (char)(0x80 | len);
    memset(frame + 2, 0, 4);   /* a zero mask: the payload goes as it is */
    memcpy(frame + 6, data, len);
    send(s->fd, frame, 6 + len, MSG_NOSIGNAL);
}

/* Returns -1 when the server closed the WebSocket. */
static int parse_frames(int index, struct sub *s) {
    struct buffer *p = &s->payload;
    uint32_t at = 0;
    while (p->len - at >= 2) {
        unsigned char *f = (unsigned char *)p->data + at;
        int opcode = f[0] & 0x0f;
        uint64_t len = f[1] & 0x7f;
        uint32_t head = 2;
        if (len == 126) {
            if (p->len - at < 4) break;
            len = ((uint64_t)f[2] << 8) | f[3];
            head = 4;
        } else if (len == 127) {
            if (p->len - at < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | f[2 + i];
            head = 10;
        }
        if (f[1] & 0x80) head += 4;   /* servers do not mask; skip a key if one came */
        if (p->len - at < head + len) break;
        char *data = p->data + at + head;
        if (opcode == 0x1) {
            char saved = data[len];
            data[len] = 0;
            take_message(index, data);
            data[len] = saved;
        } else if (opcode == 0x9) {
            n_pings++;
            send_pong(s, data, (uint32_t)len);
        } else if (opcode == 0x8) {
            return -1;
        }
        at += head + (uint32_t)len;
    }
    consume(p, at);
    return 0;
}

static void read_head(int index, struct sub *s) {
    char *end = memmem(s->raw.data, s->raw.len, "\r\n\r\n", 4);
    if (!end) return;
    *end = 0;
    int status = 0;
    sscanf(s->raw.data, "HTTP/1.%*d %d", &status);
    if (status != (transport == T_WS ? 101 : 200)) {
        n_bad_status++;
        close_sub(index, S_DEAD);
        return;
    }
    s->chunked = strcasestr(s->raw.data, "transfer-encoding: chunked") != NULL;
    consume(&s->raw, (uint32_t)(end - s->raw.data) + 4);
    s->state = S_STREAM;
    opening--;
    n_open++;
}

static void on_readable(int index) {
    struct sub *s = &subs[index];
    for (;;) {
        reserve(&s->raw, 65536);
        ssize_t got = recv(s->fd, s->raw.data + s->raw.len, s->raw.cap - s->raw.len - 1, 0);
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (got <= 0) {
            if (s->state == S_STREAM) n_closed++;
            else n_errors++;
            close_sub(index, s->state == S_STREAM ? S_DEAD : S_IDLE);
            return;
        }
        s->raw.len += (uint32_t)got;
        if (s->state == S_HEAD) {
            read_head(index, s);
            if (s->state != S_STREAM) return;
        }
        int ended = dechunk(s);
        if (transport == T_WS) ended |= parse_frames(index, s);
        else parse_events(index, s);
        if (ended) {
            n_closed++;
            close_sub(index, S_DEAD);
            return;
        }
    }
}

static void open_more(void) {
    while (opening < ramp && next_to_open < conns) open_sub(next_to_open++);
    if (next_to_open >= conns) {
        /* Subscribers whose connection failed before the stream began try again. */
        for (int i = 0; i < conns && opening < ramp; i++)
            if (subs[i].state == S_IDLE) open_sub(i);
    }
}

static int on_command(void) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    if (line[0] == 'w') write_records();
    if (line[0] == 'q') return 1;
    print_status();
    return 0;
}

static void usage(void) {
    fputs("usage: streamload --transport sse|ws --proto rpl|nchan --port P --conns N\n"
          "                  (--shared NAME | --prefix P) --records FILE\n"
          "                  [--path /sub/] [--ramp 200] [--max-time 3600]\n", stderr);
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        i++;
        if (!strcmp(a, "--transport")) transport = !strcmp(v, "ws") ? T_WS : !strcmp(v, "sse") ? T_SSE : -1;
        else if (!strcmp(a, "--proto")) proto = !strcmp(v, "nchan") ? P_NCHAN : !strcmp(v, "rpl") ? P_RPL : -1;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) conns = atoi(v);
        else if (!strcmp(a, "--shared")) shared = v;
        else if (!strcmp(a, "--prefix")) prefix = v;
        else if (!strcmp(a, "--records")) records_path = v;
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--ramp")) ramp = atoi(v);
        else if (!strcmp(a, "--max-time")) max_time = atof(v);
        else usage();
    }
    if (transport < 0 || proto < 0 || port <= 0 || conns <= 0 || ramp <= 0 || (!shared == !prefix)) usage();

    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);

    subs = calloc((size_t)conns, sizeof *subs);
    if (!subs) fail("out of memory");
    for (int i = 0; i < conns; i++) subs[i].fd = -1;
    epfd = epoll_create1(0);
    struct epoll_event stdin_ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &stdin_ev);

    uint64_t deadline = now_ns() + (uint64_t)(max_time * 1e9);
    struct epoll_event events[1024];
    while (now_ns() < deadline) {
        open_more();
        int n = epoll_wait(epfd, events, 1024, 100);
        for (int k = 0; k < n; k++) {
            uint32_t index = events[k].data.u32;
            if (index == UINT32_MAX) {
                if (on_command()) goto out;
                continue;
            }
            struct sub *s = &subs[index];
            if (s->state == S_CONNECTING) {
                int err = 0;
                socklen_t size = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &size);
                if (err) {
                    n_errors++;
                    close_sub((int)index, S_IDLE);
                } else {
                    send_request((int)index);
                }
            } else if (s->state == S_HEAD || s->state == S_STREAM) {
                on_readable((int)index);
            }
        }
    }
out:
    write_records();
    print_status();
    return 0;
}
