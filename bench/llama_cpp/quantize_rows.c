// Quantize rows of float32 with llama.cpp's own ggml_quantize_chunk (the call llama-quantize makes
// per tensor), optionally with importance weights (an imatrix row): the reference that
// bitalloc/formats/gguf.py is compared against (tests/test_gguf_types.py, bench/gguf_vs_llama_cpp.py).
//
// usage: quantize_rows TYPE_ID NROWS N_PER_ROW IN.f32 (IMATRIX.f32 | -) OUT.bin
// link:  cc -O2 quantize_rows.c LLAMA_BUILD/ggml/src/libggml-base.a -lm -lpthread -lstdc++
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

// ggml.h's declaration (enum ggml_type is int-sized); declared here so no headers are needed.
size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start, int64_t nrows,
                           int64_t n_per_row, const float * imatrix);
size_t ggml_row_size(int type, int64_t ne);

static void * read_all(const char * path, size_t n) {
    FILE * f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    void * buf = malloc(n);
    if (fread(buf, 1, n, f) != n) { fprintf(stderr, "%s: short read\n", path); exit(2); }
    fclose(f);
    return buf;
}

int main(int argc, char ** argv) {
    if (argc != 7) { fprintf(stderr, "usage: %s TYPE_ID NROWS N_PER_ROW IN.f32 IMATRIX.f32|- OUT.bin\n", argv[0]); return 2; }
    int type = atoi(argv[1]);
    int64_t nrows = atoll(argv[2]), n_per_row = atoll(argv[3]);
    float * src = read_all(argv[4], sizeof(float) * nrows * n_per_row);
    float * imatrix = argv[5][0] == '-' ? NULL : read_all(argv[5], sizeof(float) * n_per_row);
    size_t nbytes = ggml_row_size(type, n_per_row) * nrows;
    void * dst = calloc(1, nbytes);
    size_t written = ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix);
    if (written != nbytes) { fprintf(stderr, "wrote %zu bytes, expected %zu\n", written, nbytes); return 1; }
    FILE * f = fopen(argv[6], "wb");
    fwrite(dst, 1, nbytes, f);
    fclose(f);
    return 0;
}
