"""The tuner of the Triton experts kernels: times candidate tiles of both forward paths on this machine's GPU
for each problem shape (E, k, H, I) and token count T, checks each winner against an fp32 reference, and
writes moe_compiler/lowering/configs/<gpu>.json, the file triton_config.lookup reads.

    python -m moe_compiler.tune --shape E,k,H,I --dtype bfloat16 [--merge]

`python -m moe_compiler.tune --help` lists the options. search.py holds the search; timing.py (the timer) and
shapes.py (the real shapes) are shared with benchmarks/ and import no Triton. Needs a CUDA GPU and Triton;
`import moe_compiler` never imports this package.
"""
