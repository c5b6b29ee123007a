{
  description = "msa_blackwell: MiniMax Sparse Attention kernels for Hopper and Blackwell (kernel-builder)";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  outputs =
    { self, kernel-builder, ... }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
    };
}
