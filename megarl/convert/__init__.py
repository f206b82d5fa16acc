"""HF <-> Megatron conversion: the one name map (`mapping`), sharding rules (`sharding`) and
lazy safetensors reading / writing (`hf_io`). Pure torch; megatron-specific loading and
gathering live in `megarl.megatron.weights`."""
