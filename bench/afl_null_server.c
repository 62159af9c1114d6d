/*
 * A fork server that runs nothing: bench/fuzz.py's floor row under afl-fuzz. It speaks the protocol of
 * src/vmfork/fuzz/afl.py exactly (the hello announcing the map size and asking for shared-memory test cases, afl-fuzz's
 * answer, the "child pid" sent ahead, then per input one read of the request and one write of the wait status with
 * the next pid) and writes two edges from the input's first bytes into AFL++'s map, so afl-fuzz has something to
 * keep. What it measures is afl-fuzz's own work per input plus one pipe round trip on this host: the least any fork
 * server costs, which vmfork's time per input adds to.
 *
 *     gcc -O2 -o afl_null_server bench/afl_null_server.c && afl-fuzz -i IN -o OUT -- ./afl_null_server [MAP_SIZE]
 */
#include <stdint.h>
#include <stdlib.h>
#include <sys/shm.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    uint32_t size = argc > 1 ? (uint32_t)atoi(argv[1]) : 8192;
    const char *map_id = getenv("__AFL_SHM_ID"), *input_id = getenv("__AFL_SHM_FUZZ_ID");
    if (!map_id || !input_id || size < 256)
        return 2;                                   /* not under an afl-fuzz that offers shared-memory test cases */
    uint8_t *map = shmat(atoi(map_id), NULL, 0);
    const uint8_t *input = shmat(atoi(input_id), NULL, 0);
    if (map == (void *)-1 || input == (void *)-1)
        return 2;
    /* FS_OPT_ENABLED | FS_OPT_MAPSIZE | FS_OPT_SHDMEM_FUZZ, the size - 1 in bits 1-23 */
    uint32_t hello = 0x80000001u | 0x40000000u | 0x01000000u | ((size - 1) << 1), request;
    int32_t reply[2] = {0, (int32_t)getpid()};     /* wait status 0 (exit 0), the next input's pid */
    if (write(199, &hello, 4) != 4 || read(198, &request, 4) != 4 || write(199, &reply[1], 4) != 4)
        return 2;
    while (read(198, &request, 4) == 4) {
        uint32_t len = *(const uint32_t *)input;
        map[0] = 1;
        if (len > 0)
            map[1 + input[4] % 127] = 1;
        if (len > 1)
            map[128 + input[5] % 127] = 1;
        if (write(199, reply, 8) != 8)
            return 2;
    }
    return 0;
}
