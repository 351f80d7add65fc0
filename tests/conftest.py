import torch

# The test networks are tiny: one intra-op thread is fastest, and it keeps results independent
# of the machine's core count.
torch.set_num_threads(1)
