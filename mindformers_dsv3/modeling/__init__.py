"""DeepSeek-V3 network: rope (YaRN), attention (MLA), moe, mtp, decoder, model."""
