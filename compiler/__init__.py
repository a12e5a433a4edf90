"""AOT compiler: captures prefill/decode graphs into AOTInductor packages plus a manifest (compiler issue)."""
