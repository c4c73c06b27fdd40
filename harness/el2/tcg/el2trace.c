/*
 * el2trace: a QEMU TCG plugin that records calls into pKVM's hypervisor (EL2) and counts the
 * hypervisor's executed blocks, from power-on, without a debug stop.
 *
 * It knows no kernel version: the harness writes a spec (argument spec=FILE) naming, in vmlinux
 * link addresses, which instructions to watch and what to read there; the plugin turns link
 * addresses into hyp VAs once it has seen an "anchor" (a few instruction words the harness took
 * from vmlinux) translated at a VA with the same page offset. Every record goes to out=FILE as
 * soon as it is made (the harness reads the file while the machine runs); the block counts are
 * written when QEMU exits.
 *
 * Spec lines:
 *   vars <vmemmap_link> <physvirt_link> <page_stride>   where `p`/`q` reads find struct hyp_page
 *   anchor <link> <hex words...>                          learn delta = link - vaddr
 *   text <link> <size> <path>                             hyp text bytes: coverage, and the test
 *                                                         that a block is hypervisor code
 *   probe <fn> <e|r> <link> <reads|->                     an entry (e) or return (r) of function fn
 *   extra <register name>                                 one more register in every probe record
 * Reads (comma separated): m<reg>+<off>:<len> at a register; e<reg>+<off>:<len> at the register
 * as it was at this vCPU's last entry of fn; p<reg>:<len>, q<reg>:<len> the hyp_page of the page
 * holding the hyp VA in the register (now, or at entry); z<reg>:<nreg> (now), y<reg>:<nreg> (at
 * entry) scan the pages whose first pfn is in <reg> and whose count is in <nreg> (at most
 * SCAN_MAX) past each page's first word, a memcache link: u64 pages scanned, u64 PA of the first
 * non-zero byte in a page past the first SCAN_HASHED or ~0, then a 64-bit FNV-1a hash of that part
 * of each of the first SCAN_HASHED pages (0 past the pages scanned): 144 bytes. reg 0..30 is
 * x0..x30, 31 is sp.
 *
 * Record (little endian): u32 len, u8 type, u8 kind, u16 fn, u32 vcpu, u32 failed-read mask,
 * u64 seq, u64 link pc, then for probes u64 x0..x7, x30, sp, the extra registers and the reads'
 * bytes. A vars record (the values of hyp_vmemmap and hyp_physvirt_offset) comes before the
 * first probe record that sees them changed.
 */
#include <glib.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

enum { REC_META = 1, REC_PROBE = 2, REC_COVER = 3, REC_STATS = 4, REC_VARS = 5 };
enum { MAX_READS = 4, MAX_FN = 32, NREGS = 10, MAX_EXTRA = 2, MAX_ANCHOR_WORDS = 8 };
enum { PAGE = 4096, SCAN_MAX = 1024, SCAN_HASHED = 16, SCAN_LEN = 16 + 8 * SCAN_HASHED };

struct read_spec { char kind; int reg; uint64_t off; uint32_t len; };

struct probe {
    uint64_t link;
    uint16_t fn;
    uint8_t kind;                  /* 'e' or 'r' */
    int nreads;
    struct read_spec reads[MAX_READS];
};

struct anchor { uint64_t link; int nwords; uint32_t words[MAX_ANCHOR_WORDS]; };

struct block { uint64_t link; uint32_t size; struct qemu_plugin_scoreboard *count; };

static qemu_plugin_id_t self;
static FILE *out;
static GMutex out_lock;
static uint64_t seq, ignored, read_failures;
static GHashTable *probes;         /* link -> struct probe */
static GArray *anchors;            /* struct anchor */
static GHashTable *blocks;         /* link ^ size<<48 -> struct block */
static GMutex blocks_lock, learn_lock;
static bool have_delta;
static uint64_t delta;             /* link - hyp VA */
static uint64_t vmemmap_link, physvirt_link, page_stride;
static uint8_t *text;
static uint64_t text_link, text_size;
static unsigned max_vcpus;
static uint64_t (*saved)[MAX_FN][NREGS];   /* [vcpu][fn]: registers at the last entry */

static struct qemu_plugin_register *reg_x[31], *reg_sp, *reg_cpsr, *reg_extra[MAX_EXTRA];
static char *extra_names[MAX_EXTRA];
static int n_extra;
static uint64_t last_vars[2];

static void die(const char *what, const char *arg)
{
    fprintf(stderr, "el2trace: %s%s\n", what, arg ? arg : "");
    exit(2);
}

/* --- output ------------------------------------------------------------------------------- */

struct hdr { uint32_t len; uint8_t type, kind; uint16_t fn; uint32_t vcpu, failed; uint64_t seq, pc; };

static void emit(struct hdr *h, const void *payload, size_t size)
{
    h->len = sizeof(*h) + size;
    g_mutex_lock(&out_lock);
    h->seq = seq++;
    fwrite(h, sizeof(*h), 1, out);
    if (size) {
        fwrite(payload, size, 1, out);
    }
    fflush(out);
    g_mutex_unlock(&out_lock);
}

/* --- registers and memory ------------------------------------------------------------------ */

static uint64_t read_reg(struct qemu_plugin_register *r)
{
    g_autoptr(GByteArray) buf = g_byte_array_new();
    uint64_t v = 0;
    int n = r ? qemu_plugin_read_register(r, buf) : -1;
    if (n > 0) {
        memcpy(&v, buf->data, n < 8 ? n : 8);
    }
    return v;
}

static bool read_mem(uint64_t va, void *dst, size_t len)
{
    g_autoptr(GByteArray) buf = g_byte_array_new();
    if (!qemu_plugin_read_memory_vaddr(va, buf, len) || buf->len < len) {
        memset(dst, 0, len);
        return false;
    }
    memcpy(dst, buf->data, len);
    return true;
}

static uint64_t reg_value(const uint64_t *regs, int reg)
{
    return reg == 31 ? regs[9] : reg == 30 ? regs[8] : reg < 8 ? regs[reg] : read_reg(reg_x[reg]);
}

/* hyp_vmemmap and hyp_physvirt_offset now; a vars record when they changed (under out_lock's
 * order: the record comes before the probe record that used them). */
static bool read_vars(uint64_t vars[2])
{
    if (!page_stride || !read_mem(vmemmap_link - delta, &vars[0], 8)
        || !read_mem(physvirt_link - delta, &vars[1], 8)) {
        return false;
    }
    if (vars[0] != __atomic_load_n(&last_vars[0], __ATOMIC_RELAXED)
        || vars[1] != __atomic_load_n(&last_vars[1], __ATOMIC_RELAXED)) {
        struct hdr h = { .type = REC_VARS };
        __atomic_store_n(&last_vars[0], vars[0], __ATOMIC_RELAXED);
        __atomic_store_n(&last_vars[1], vars[1], __ATOMIC_RELAXED);
        emit(&h, vars, 16);
    }
    return true;
}

/* The hyp_page of the page holding hyp VA `va`: hyp_vmemmap + hyp_pa(va) / PAGE_SIZE. */
static bool page_addr(const uint64_t vars[2], uint64_t va, uint64_t *addr)
{
    *addr = vars[0] + ((va + vars[1]) >> 12) * page_stride;
    return vars[0] != 0;
}

/* What `pages` pages from pfn hold past their first word (see `z` reads); out: SCAN_LEN bytes. */
static bool page_scan(const uint64_t vars[2], uint64_t pfn, uint64_t pages, uint64_t *out)
{
    static __thread uint8_t page[PAGE];
    memset(out, 0, SCAN_LEN);
    out[0] = pages < SCAN_MAX ? pages : SCAN_MAX;
    out[1] = ~0ull;
    for (uint64_t i = 0; i < out[0]; i++) {
        uint64_t pa = (pfn + i) * PAGE, hash = 0xcbf29ce484222325ull;
        if (!read_mem(pa - vars[1], page, PAGE)) {
            return false;
        }
        for (int b = 8; b < PAGE; b++) {
            if (page[b] && out[1] == ~0ull && i >= SCAN_HASHED) {
                out[1] = pa + b;       /* a page with no hash of its own */
            }
            hash = (hash ^ page[b]) * 0x100000001b3ull;
        }
        if (i < SCAN_HASHED) {
            out[2 + i] = hash;
        }
    }
    return true;
}

/* --- probes --------------------------------------------------------------------------------- */

static void on_probe(unsigned int vcpu, void *udata)
{
    struct probe *p = udata;
    uint64_t el = (read_reg(reg_cpsr) >> 2) & 3;
    if (el != 2) {
        __atomic_fetch_add(&ignored, 1, __ATOMIC_RELAXED);
        return;
    }
    uint8_t payload[(NREGS + MAX_EXTRA) * 8 + MAX_READS * 256];
    uint64_t regs[NREGS], vars[2] = { 0, 0 };
    bool have_vars = read_vars(vars);
    for (int i = 0; i < 8; i++) {
        regs[i] = read_reg(reg_x[i]);
    }
    regs[8] = read_reg(reg_x[30]);
    regs[9] = read_reg(reg_sp);
    memcpy(payload, regs, sizeof(regs));
    size_t at = sizeof(regs);
    for (int i = 0; i < n_extra; i++, at += 8) {
        uint64_t v = read_reg(reg_extra[i]);
        memcpy(payload + at, &v, 8);
    }
    uint32_t failed = 0;
    uint64_t *entry = vcpu < max_vcpus ? saved[vcpu][p->fn] : regs;
    for (int i = 0; i < p->nreads; i++) {
        const struct read_spec *r = &p->reads[i];
        const uint64_t *from = (r->kind == 'e' || r->kind == 'q' || r->kind == 'y') ? entry : regs;
        uint64_t va = reg_value(from, r->reg) + r->off;
        bool ok = true;
        if (r->kind == 'z' || r->kind == 'y') {
            uint64_t scan[SCAN_LEN / 8] = { 0 };
            ok = have_vars && page_scan(vars, va - r->off, reg_value(from, (int)r->off), scan);
            memcpy(payload + at, scan, sizeof(scan));
        } else if (r->kind == 'p' || r->kind == 'q') {
            ok = have_vars && page_addr(vars, va, &va);
        }
        ok = ok && (r->kind == 'z' || r->kind == 'y' || read_mem(va, payload + at, r->len));
        if (!ok) {
            memset(payload + at, 0, r->len);
            failed |= 1u << i;
            __atomic_fetch_add(&read_failures, 1, __ATOMIC_RELAXED);
        }
        at += r->len;
    }
    if (p->kind == 'e' && vcpu < max_vcpus) {
        memcpy(saved[vcpu][p->fn], regs, sizeof(regs));
    }
    struct hdr h = { .type = REC_PROBE, .kind = p->kind, .fn = p->fn, .vcpu = vcpu,
                     .failed = failed, .pc = p->link };
    emit(&h, payload, at);
}

/* --- translation ------------------------------------------------------------------------------ */

static uint32_t insn_word(struct qemu_plugin_insn *insn)
{
    uint32_t w = 0;
    qemu_plugin_insn_data(insn, &w, sizeof(w));
    return w;
}

static void learn_delta(struct qemu_plugin_tb *tb)
{
    uint64_t va = qemu_plugin_tb_vaddr(tb);
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (guint a = 0; a < anchors->len; a++) {
        struct anchor *an = &g_array_index(anchors, struct anchor, a);
        size_t cmp = MIN(n, (size_t)an->nwords);
        if ((va & 0xfff) != (an->link & 0xfff) || cmp < 2) {
            continue;
        }
        size_t i = 0;
        while (i < cmp && insn_word(qemu_plugin_tb_get_insn(tb, i)) == an->words[i]) {
            i++;
        }
        if (i == cmp) {
            delta = an->link - va;
            __atomic_store_n(&have_delta, true, __ATOMIC_RELEASE);
            struct hdr h = { .type = REC_META, .pc = an->link };
            emit(&h, &delta, sizeof(delta));
            return;
        }
    }
}

/* Is this block the hypervisor's code? Its VA maps into the hyp text and some of its words are
 * vmlinux's words there. Not all: alternatives patch whole sequences at boot (the LSE atomics of
 * hyp_spin_lock fill the first block of hyp_put_page); a host process at the same VA would not
 * hold the same code. (A block whose every word was patched is not counted.) */
static bool is_hyp_block(struct qemu_plugin_tb *tb, uint64_t link, size_t n)
{
    if (!text) {
        return true;        /* no text given: probes check the EL at run time anyway */
    }
    if (link < text_link || link + 4 * n > text_link + text_size) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t want;
        memcpy(&want, text + (link - text_link) + 4 * i, 4);
        if (insn_word(qemu_plugin_tb_get_insn(tb, i)) == want) {
            return true;
        }
    }
    return false;
}

static void count_block(struct qemu_plugin_tb *tb, uint64_t link, size_t n)
{
    uint64_t key = link ^ ((uint64_t)n << 48);
    g_mutex_lock(&blocks_lock);
    struct block *b = g_hash_table_lookup(blocks, &key);
    if (!b) {
        b = g_new0(struct block, 1);
        b->link = link;
        b->size = 4 * n;
        b->count = qemu_plugin_scoreboard_new(sizeof(uint64_t));
        uint64_t *k = g_new(uint64_t, 1);
        *k = key;
        g_hash_table_insert(blocks, k, b);
    }
    g_mutex_unlock(&blocks_lock);
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(
        tb, QEMU_PLUGIN_INLINE_ADD_U64, qemu_plugin_scoreboard_u64(b->count), 1);
}

static void reinstall(qemu_plugin_id_t id);

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    if (!__atomic_load_n(&have_delta, __ATOMIC_ACQUIRE)) {
        g_mutex_lock(&learn_lock);
        bool learnt = !have_delta && (learn_delta(tb), have_delta);
        g_mutex_unlock(&learn_lock);
        if (!learnt) {
            return;
        }
        /* Blocks translated before the delta was known were not instrumented: flush them all,
         * once, so the hypervisor's code is counted from here on. */
        qemu_plugin_reset(self, reinstall);
    }
    uint64_t link = qemu_plugin_tb_vaddr(tb) + delta;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (!is_hyp_block(tb, link, n)) {
        return;
    }
    if (text) {
        count_block(tb, link, n);
    }
    for (size_t i = 0; i < n; i++) {
        struct probe *p = g_hash_table_lookup(probes, &(uint64_t){ link + 4 * i });
        if (p) {
            qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, i), on_probe,
                                                   QEMU_PLUGIN_CB_R_REGS, p);
        }
    }
}

/* --- set-up and exit ----------------------------------------------------------------------- */

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu)
{
    if (reg_cpsr) {
        return;
    }
    g_autoptr(GArray) regs = qemu_plugin_get_registers();
    for (guint i = 0; i < regs->len; i++) {
        qemu_plugin_reg_descriptor *d = &g_array_index(regs, qemu_plugin_reg_descriptor, i);
        int x;
        if (sscanf(d->name, "x%d", &x) == 1 && x >= 0 && x <= 30) {
            reg_x[x] = d->handle;
        } else if (!strcmp(d->name, "sp")) {
            reg_sp = d->handle;
        } else if (!strcmp(d->name, "cpsr")) {
            reg_cpsr = d->handle;
        }
        for (int e = 0; e < n_extra; e++) {
            if (!strcmp(d->name, extra_names[e])) {
                reg_extra[e] = d->handle;
            }
        }
    }
    if (!reg_cpsr || !reg_sp || !reg_x[30]) {
        die("this QEMU exposes no x30, sp or cpsr to plugins", NULL);
    }
}

static void emit_block(gpointer key, gpointer value, gpointer data)
{
    struct block *b = value;
    struct { uint64_t link; uint32_t size, pad; uint64_t count; } c = {
        b->link, b->size, 0, qemu_plugin_u64_sum(qemu_plugin_scoreboard_u64(b->count)) };
    struct hdr h = { .type = REC_COVER, .pc = b->link };
    if (c.count) {
        emit(&h, &c, sizeof(c));
    }
}

static void on_qemu_exit(qemu_plugin_id_t id, void *p)
{
    g_hash_table_foreach(blocks, emit_block, NULL);
    uint64_t extra_found = 0;
    for (int e = 0; e < n_extra; e++) {
        extra_found |= (uint64_t)(reg_extra[e] != NULL) << e;
    }
    uint64_t stats[5] = { ignored, read_failures, g_hash_table_size(blocks), have_delta, extra_found };
    struct hdr h = { .type = REC_STATS };
    emit(&h, stats, sizeof(stats));
    fclose(out);
}

static void reinstall(qemu_plugin_id_t id)
{
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
}

static uint64_t hex(const char *s)
{
    return strtoull(s, NULL, 16);
}

static void parse_reads(struct probe *p, char *list)
{
    if (!strcmp(list, "-")) {
        return;
    }
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        if (p->nreads == MAX_READS) {
            die("too many reads in a probe: ", tok);
        }
        struct read_spec *r = &p->reads[p->nreads++];
        r->kind = tok[0];
        unsigned long long off = 0;
        int ok = (r->kind == 'm' || r->kind == 'e')
            ? sscanf(tok + 1, "%d+%llx:%u", &r->reg, &off, &r->len) == 3
            : r->kind == 'z' || r->kind == 'y' ? sscanf(tok + 1, "%d:%llu", &r->reg, &off) == 2 && off < 8
            : (r->kind == 'p' || r->kind == 'q') && sscanf(tok + 1, "%d:%u", &r->reg, &r->len) == 2;
        r->off = off;                  /* for a page scan: the register holding the page count */
        if (r->kind == 'z' || r->kind == 'y') {
            r->len = SCAN_LEN;
        }
        if (!ok || r->reg < 0 || r->reg > 31 || r->len == 0 || r->len > 256) {
            die("bad read in the spec: ", tok);
        }
    }
}

static void load_text(uint64_t link, uint64_t size, const char *path)
{
    gsize len;
    gchar *data;
    if (!g_file_get_contents(path, &data, &len, NULL) || len != size) {
        die("cannot read the hyp text bytes from ", path);
    }
    text = (uint8_t *)data;
    text_link = link;
    text_size = size;
}

static void load_spec(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[4096];
    if (!f) {
        die("cannot open the spec ", path);
    }
    while (fgets(line, sizeof(line), f)) {
        char *w[4 + MAX_ANCHOR_WORDS] = { 0 };
        int n = 0;
        for (char *t = strtok(line, " \t\n"); t && n < (int)G_N_ELEMENTS(w); t = strtok(NULL, " \t\n")) {
            w[n++] = t;
        }
        if (n == 0 || w[0][0] == '#') {
            continue;
        }
        if (!strcmp(w[0], "vars") && n == 4) {
            vmemmap_link = hex(w[1]);
            physvirt_link = hex(w[2]);
            page_stride = hex(w[3]);
        } else if (!strcmp(w[0], "anchor") && n >= 4) {
            struct anchor a = { .link = hex(w[1]) };
            for (int i = 2; i < n; i++) {
                a.words[a.nwords++] = (uint32_t)hex(w[i]);
            }
            g_array_append_val(anchors, a);
        } else if (!strcmp(w[0], "extra") && n == 2 && n_extra < MAX_EXTRA) {
            extra_names[n_extra++] = g_strdup(w[1]);
        } else if (!strcmp(w[0], "text") && n == 4) {
            load_text(hex(w[1]), hex(w[2]), w[3]);
        } else if (!strcmp(w[0], "probe") && n == 5) {
            struct probe *p = g_new0(struct probe, 1);
            p->fn = (uint16_t)strtoul(w[1], NULL, 10);
            p->kind = w[2][0];
            p->link = hex(w[3]);
            if (p->fn >= MAX_FN || (p->kind != 'e' && p->kind != 'r')) {
                die("bad probe in the spec: ", w[1]);
            }
            parse_reads(p, w[4]);
            g_hash_table_insert(probes, &p->link, p);
        } else {
            die("unknown spec line: ", w[0]);
        }
    }
    fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    const char *spec = NULL, *outp = NULL;
    for (int i = 0; i < argc; i++) {
        if (g_str_has_prefix(argv[i], "spec=")) {
            spec = argv[i] + 5;
        } else if (g_str_has_prefix(argv[i], "out=")) {
            outp = argv[i] + 4;
        } else {
            die("unknown argument ", argv[i]);
        }
    }
    if (!spec || !outp || !info->system_emulation) {
        die("usage: -plugin el2trace.so,spec=FILE,out=FILE (system emulation)", NULL);
    }
    self = id;
    probes = g_hash_table_new(g_int64_hash, g_int64_equal);
    blocks = g_hash_table_new(g_int64_hash, g_int64_equal);
    anchors = g_array_new(false, true, sizeof(struct anchor));
    load_spec(spec);
    out = fopen(outp, "wb");
    if (!out) {
        die("cannot write ", outp);
    }
    max_vcpus = info->system.max_vcpus;
    saved = g_malloc0(sizeof(*saved) * max_vcpus);
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    reinstall(id);
    return 0;
}
