/*
 * argv_keys.c: Triton's API keys from a file, never on its command line.
 *
 * Triton 2.51 takes its keys only as flags (--http-restricted-api=APIS:HEADER=KEY), and
 * every local user can read /proc/PID/cmdline. So AbdoServe passes placeholders
 * (@abdoserve-key:NAME@) and preloads this library (LD_PRELOAD) into tritonserver. Its
 * constructor runs before Triton's main: it reads NAME=VALUE lines from the file that
 * $ABDOSERVE_TRITON_KEY_FILE names (mode 0600), points each argv entry holding a
 * placeholder at a heap copy with the key in its place, and removes the file. The
 * memory /proc/PID/cmdline shows is never written: it keeps the placeholders.
 *
 * Then it drops itself from LD_PRELOAD (the launcher puts it first) and drops the
 * variable, so Triton's children (the Python-backend stubs) never load it.
 * Any failure prints a message and exits with status 2 before Triton starts.
 * Built and used by abdoserve.deploy.triton_keys.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KEY_FILE_VARIABLE "ABDOSERVE_TRITON_KEY_FILE"
#define PREFIX "@abdoserve-key:"
#define MAX_KEYS 16

struct key {
    const char *name;
    const char *value;
};

static char text[8192]; /* the key file; the table below points into it */
static struct key keys[MAX_KEYS];
static int key_count;

static void fail(const char *what, const char *detail)
{
    /* The detail is a file name or a placeholder, never a key. */
    fprintf(stderr, "abdoserve argv_keys: %s%s\n", what, detail);
    _exit(2);
}

static int is_tritonserver(const char *argv0)
{
    const char *slash = strrchr(argv0, '/');
    return strcmp(slash == NULL ? argv0 : slash + 1, "tritonserver") == 0;
}

/* Reads the whole file into `text`; refuses one that others may read. */
static void read_file(const char *path)
{
    struct stat status;
    size_t size = 0;
    ssize_t got;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("cannot open the key file ", path);
    if (fstat(fd, &status) != 0 || (status.st_mode & 077) != 0)
        fail("the key file must be mode 0600: ", path);
    while ((got = read(fd, text + size, sizeof text - 1 - size)) > 0)
        size += (size_t)got;
    close(fd);
    if (got < 0 || size == sizeof text - 1)
        fail("cannot read the key file (or it is too large): ", path);
    text[size] = '\0';
}

/* Splits `text` into the key table, in place. */
static void parse_keys(const char *path)
{
    char *line = text;
    while (*line != '\0') {
        char *end = strchr(line, '\n');
        if (end != NULL)
            *end = '\0';
        char *equals = strchr(line, '=');
        if (equals == NULL || equals == line || key_count == MAX_KEYS)
            fail("a key file line is not NAME=VALUE (or too many): ", path);
        *equals = '\0';
        keys[key_count].name = line;
        keys[key_count].value = equals + 1;
        key_count++;
        line = end == NULL ? line + strlen(line) : end + 1;
    }
}

static const char *lookup(const char *name, size_t length, const char *placeholder)
{
    for (int i = 0; i < key_count; i++)
        if (strlen(keys[i].name) == length && strncmp(keys[i].name, name, length) == 0)
            return keys[i].value;
    fail("no key in the key file for the placeholder in ", placeholder);
    return NULL;
}

static void append(char *out, size_t *length, const char *from, size_t count)
{
    if (out != NULL)
        memcpy(out + *length, from, count);
    *length += count;
}

/* `arg` with each placeholder replaced by its key, written to `out` unless it is NULL
 * (the first pass only measures); returns the length. */
static size_t expand(const char *arg, char *out)
{
    const char *rest = arg;
    const char *at;
    size_t length = 0;
    while ((at = strstr(rest, PREFIX)) != NULL) {
        const char *name = at + strlen(PREFIX);
        const char *end = strchr(name, '@');
        if (end == NULL)
            fail("an unterminated placeholder in ", arg);
        const char *value = lookup(name, (size_t)(end - name), arg);
        append(out, &length, rest, (size_t)(at - rest));
        append(out, &length, value, strlen(value));
        rest = end + 1;
    }
    append(out, &length, rest, strlen(rest));
    return length;
}

static void substitute(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strstr(argv[i], PREFIX) == NULL)
            continue;
        size_t length = expand(argv[i], NULL);
        char *copy = malloc(length + 1);
        if (copy == NULL)
            fail("out of memory", "");
        expand(argv[i], copy);
        copy[length] = '\0';
        argv[i] = copy; /* main sees the copy; the original memory keeps the placeholder */
    }
}

/* Our library is LD_PRELOAD's first entry: the rest (if any) stays for the children. */
static void drop_preload(void)
{
    const char *preload = getenv("LD_PRELOAD");
    const char *rest = preload == NULL ? NULL : strpbrk(preload, ": ");
    if (rest != NULL && rest[1] != '\0')
        setenv("LD_PRELOAD", rest + 1, 1);
    else
        unsetenv("LD_PRELOAD");
}

__attribute__((constructor)) static void argv_keys(int argc, char **argv, char **envp)
{
    (void)envp;
    if (argc < 1 || !is_tritonserver(argv[0]))
        return; /* unshare, sh, mount: the launcher's wrappers pass the variables on */
    const char *path = getenv(KEY_FILE_VARIABLE);
    if (path == NULL || *path == '\0')
        fail("no key file: ", KEY_FILE_VARIABLE " is not set");
    read_file(path);
    unlink(path); /* read once; the launcher removes it too, should this fail */
    parse_keys(path);
    substitute(argc, argv);
    explicit_bzero(text, sizeof text); /* the keys now live only in argv's copies */
    key_count = 0;
    drop_preload();
    unsetenv(KEY_FILE_VARIABLE);
}
