/* A C client of the book's SysMonPublic.h layout (x64): reads a buffer that etwmon's readinto filled and prints
 * every record's fields, one line each, so a test can compare them with etwmon.parse. The structs are written
 * after the layout table, not generated from etwmon, and the asserts pin offsets and sizes.
 * Built as is, it is the book's client: it walks by Size and never looks past the fixed fields, so it ignores
 * etwmon's extension block. Built with -DREAD_EXTENSION it also prints the block (after the README's table). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t WCHAR;
typedef uint16_t USHORT;
typedef uint32_t ULONG;
typedef uint64_t ULONG64;
typedef int64_t LARGE_INTEGER;

enum ItemType { None, ProcessCreate, ProcessExit, ThreadCreate, ThreadExit, ImageLoad,
                RecordsLost = 100, ProcessExec = 101 };

struct ItemHeader { short Type; USHORT Size; LARGE_INTEGER Time; };
struct ProcessExitInfo { struct ItemHeader h; ULONG ProcessId; ULONG ExitCode; };
struct ProcessCreateInfo { struct ItemHeader h; ULONG ProcessId; ULONG ParentProcessId; ULONG CreatingThreadId;
                           ULONG CreatingProcessId; USHORT CommandLineLength; WCHAR CommandLine[1]; };
struct ThreadCreateInfo { struct ItemHeader h; ULONG ThreadId; ULONG ProcessId; };
struct ThreadExitInfo { struct ThreadCreateInfo base; ULONG ExitCode; };
struct ImageLoadInfo { struct ItemHeader h; ULONG ProcessId; ULONG ImageSize; ULONG64 LoadAddress;
                       WCHAR ImageFileName[301]; };
struct RecordsLostInfo { struct ItemHeader h; ULONG Count; };
/* etwmon's extension block: at sizeof(ProcessCreateInfo) + 2 * CommandLineLength in a ProcessCreate/Exec, at
 * sizeof(the struct) in ProcessExit, ThreadCreate and ThreadExit; then Tag/Length/value fields, unaligned. */
struct ExtensionHeader { USHORT Version; USHORT Length; ULONG Flags; };
struct ExtensionField { USHORT Tag; USHORT Length; };

_Static_assert(sizeof(struct ItemHeader) == 16, "ItemHeader");
_Static_assert(offsetof(struct ItemHeader, Size) == 2, "Size");
_Static_assert(offsetof(struct ItemHeader, Time) == 8, "Time");
_Static_assert(sizeof(struct ProcessExitInfo) == 24, "ProcessExitInfo");
_Static_assert(offsetof(struct ProcessExitInfo, ExitCode) == 20, "ExitCode");
_Static_assert(sizeof(struct ProcessCreateInfo) == 40, "ProcessCreateInfo");
_Static_assert(offsetof(struct ProcessCreateInfo, CreatingProcessId) == 28, "CreatingProcessId");
_Static_assert(offsetof(struct ProcessCreateInfo, CommandLineLength) == 32, "CommandLineLength");
_Static_assert(offsetof(struct ProcessCreateInfo, CommandLine) == 34, "CommandLine");
_Static_assert(sizeof(struct ThreadCreateInfo) == 24, "ThreadCreateInfo");
_Static_assert(sizeof(struct ThreadExitInfo) == 32, "ThreadExitInfo");
_Static_assert(offsetof(struct ThreadExitInfo, ExitCode) == 24, "ThreadExit ExitCode");
_Static_assert(sizeof(struct ImageLoadInfo) == 640, "ImageLoadInfo");
_Static_assert(offsetof(struct ImageLoadInfo, LoadAddress) == 24, "LoadAddress");
_Static_assert(offsetof(struct ImageLoadInfo, ImageFileName) == 32, "ImageFileName");
_Static_assert(sizeof(struct RecordsLostInfo) == 24, "RecordsLostInfo");
_Static_assert(sizeof(struct ExtensionHeader) == 8, "ExtensionHeader");
_Static_assert(sizeof(struct ExtensionField) == 4, "ExtensionField");

/* Prints UTF-16 code units as hex so the test compares them exactly, whatever they hold. */
static void print_wchars(const WCHAR *s, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%s%04x", i ? "." : "", (unsigned)s[i]);
    if (n == 0) printf("-");
}

#ifdef READ_EXTENSION
/* Prints " ext=VERSION/FLAGS" and every field as " TAG:hex bytes" (memcpy: the fields are not aligned). */
static void print_extension(const unsigned char *record, size_t base) {
    const struct ItemHeader *header = (const struct ItemHeader *)record;
    if (header->Size < base + sizeof(struct ExtensionHeader)) return;
    struct ExtensionHeader ext;
    memcpy(&ext, record + base, sizeof ext);
    printf(" ext=%u/%u", (unsigned)ext.Version, (unsigned)ext.Flags);
    if (ext.Version != 1 || base + ext.Length > header->Size) return;
    size_t pos = base + sizeof ext, end = base + ext.Length;
    while (pos + sizeof(struct ExtensionField) <= end) {
        struct ExtensionField field;
        memcpy(&field, record + pos, sizeof field);
        pos += sizeof field;
        if (pos + field.Length > end) break;
        printf(" %u:", (unsigned)field.Tag);
        for (size_t i = 0; i < field.Length; i++) printf("%02x", record[pos + i]);
        pos += field.Length;
    }
}
#define EXTENSION(base) print_extension((const unsigned char *)header, (base))
#else
#define EXTENSION(base) ((void)0)
#endif

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s FILE\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    static unsigned char buffer[1 << 20];
    size_t size = fread(buffer, 1, sizeof buffer, f);
    fclose(f);
    /* The book's client loop, with the exercise's guard against Size 0. */
    size_t offset = 0;
    while (offset < size) {
        const struct ItemHeader *header = (const struct ItemHeader *)(buffer + offset);
        if (header->Size < sizeof(struct ItemHeader)) { printf("BAD %zu\n", offset); return 1; }
        printf("%d %lld ", header->Type, (long long)header->Time);
        switch (header->Type) {
        case ProcessCreate:
        case ProcessExec: {
            const struct ProcessCreateInfo *info = (const void *)header;
            printf("%u %u %u %u %u ", info->ProcessId, info->ParentProcessId, info->CreatingThreadId,
                   info->CreatingProcessId, info->CommandLineLength);
            print_wchars(info->CommandLine, info->CommandLineLength);
            printf(" nul=%u", (unsigned)info->CommandLine[info->CommandLineLength]);
            EXTENSION(sizeof(struct ProcessCreateInfo) + 2 * (size_t)info->CommandLineLength);
            break;
        }
        case ProcessExit: {
            const struct ProcessExitInfo *info = (const void *)header;
            printf("%u %u", info->ProcessId, info->ExitCode);
            EXTENSION(sizeof(struct ProcessExitInfo));
            break;
        }
        case ThreadCreate: {
            const struct ThreadCreateInfo *info = (const void *)header;
            printf("%u %u", info->ThreadId, info->ProcessId);
            EXTENSION(sizeof(struct ThreadCreateInfo));
            break;
        }
        case ThreadExit: {
            const struct ThreadExitInfo *info = (const void *)header;
            printf("%u %u %u", info->base.ThreadId, info->base.ProcessId, info->ExitCode);
            EXTENSION(sizeof(struct ThreadExitInfo));
            break;
        }
        case ImageLoad: {
            const struct ImageLoadInfo *info = (const void *)header;
            size_t n = 0;
            while (n < 301 && info->ImageFileName[n]) n++;
            printf("%u %u %llu ", info->ProcessId, info->ImageSize, (unsigned long long)info->LoadAddress);
            print_wchars(info->ImageFileName, n);
            break;
        }
        case RecordsLost: {
            const struct RecordsLostInfo *info = (const void *)header;
            printf("%u", info->Count);
            break;
        }
        default:
            printf("skipped %u", header->Size);
        }
        printf("\n");
        offset += header->Size;
    }
    return 0;
}
