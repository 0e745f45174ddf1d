"""One microbenchmark per fused op, named after the op (DESIGN.md section 2)."""
