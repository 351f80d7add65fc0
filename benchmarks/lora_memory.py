"""Parameters held in LoRA distillation at full SD1.5 / SDXL size: one UNet (teacher = adapters
disabled) against two copies; counted on the meta device (no weights, no memory). Prints the
table rows of docs/throughput.md.

    python3 benchmarks/lora_memory.py
"""
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from proreflow.sd.lora import add_lora

SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
for name, cfg in [("SD1.5", SD15), ("SDXL", SDXL)]:
    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg)
        base = sum(p.numel() for p in unet.parameters())
        add_lora(unet, 64)
        lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    one, two = base + lora, 2 * base + lora
    print(f"| {name} | {base / 1e6:.1f} M | {lora / 1e6:.2f} M | {one / 1e6:.1f} M ({one * 4 / 2**30:.2f} GiB fp32) "
          f"| {two / 1e6:.1f} M ({two * 4 / 2**30:.2f} GiB fp32) | {one / two:.2f} |")
