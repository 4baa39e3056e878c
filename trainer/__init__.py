"""The trainer package: flags, config, strategy, step, outer loop and command-line entries."""
import os

# TensorFlow's C++ INFO/WARNING lines drown the one-line-per-loop console; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels on every x86 CPU: TensorFlow turns them on by itself only where it finds AVX-512
# (VNNI, BF16 or AMX). Without them, on an AVX2-only CPU, Eigen's convolutions train the demo at
# 92 images/s instead of 249 and have no gradient for grouped convolutions (ConvNeXt cannot train;
# measured 2026-12-04, AMD EPYC with AVX2). Set before TensorFlow's import; TF_ENABLE_ONEDNN_OPTS=0
# still turns them off. data/ and models/ set the same default for their own imports.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
