/* The image-load storm: dlopen() and dlclose() one library N times, as fast as the machine goes. Each dlopen
 * after a dlclose maps the library again (one image load each); the loader's own count of loads (dlpi_adds)
 * says how many there were.
 *
 * Usage: storm_dlopen LIBRARY N
 * Report on stdout: "loads <dlpi_adds during the storm> elapsed_ns <ns>"
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int adds_of(struct dl_phdr_info *info, size_t size, void *data)
{
	*(unsigned long long *)data = info->dlpi_adds;
	return 1;
}

int main(int argc, char **argv)
{
	unsigned long long before = 0, after = 0;
	struct timespec t0, t1;
	long n;

	if (argc != 3) {
		fprintf(stderr, "usage: %s LIBRARY N\n", argv[0]);
		return 2;
	}
	n = atol(argv[2]);
	dl_iterate_phdr(adds_of, &before);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++) {
		void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);

		if (!h) {
			fprintf(stderr, "%s\n", dlerror());
			return 1;
		}
		dlclose(h);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	dl_iterate_phdr(adds_of, &after);
	printf("loads %llu elapsed_ns %lld\n", after - before,
	       (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
