"""Built-in combiners: how a base model's distribution and a memory's are mixed."""
