// fastvis: a fully connected layer on a matrix of rows (op family: linear).
//
// Semantics of torch.nn.functional.linear on a 2-D input:
//
//     y[m, n] = sum_k x[m, k] * weight[n, k] + bias[n]       (bias optional)
//
// x is (M, K), weight (N, K) as nn.Linear stores it, bias (N,) or null, y (M, N), all of
// one dtype (float32 or float64) on the CPU; x, weight and y need unit stride along their
// last dimension (any row stride of at least that width), bias any stride. y must not
// overlap x, weight or bias.
//
// What it is for: the classifier heads of the models at small batch, where the product is
// a few rows against a weight of several MB that has left the caches since the last image
// (InceptionNeXt's MLP head: 16 MB). Up to core::kFewRows (8) rows, float32, the core's own
// AVX-512 kernel reads each weight row once as a stream of dot products, the columns split
// over the threads; more rows run the core's GEMM in column blocks (the own packed-panel
// kernel where active, else the BLAS; float64 always the BLAS). The summation order of
// each output depends only on the shape: results are the same for any thread count.
#pragma once
#include "fastvis/tensor.h"

namespace fastvis {

// y = x weight^T + bias. Throws fastvis::Error (ValueError / TypeError) on bad arguments.
void linear_forward(const TensorView& x, const TensorView& weight, const TensorView* bias,
                    const TensorView& y);

}  // namespace fastvis
