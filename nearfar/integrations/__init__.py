"""Integrations with the libraries users already run: Hugging Face transformers (``nearfar.integrations.transformers``;
a nearfar pattern in place of a model's attention and a bounded KV cache: ``transformers_patterns``,
``transformers_cache``) and diffusers (``nearfar.integrations.diffusers``). Each is an optional extra
(``pip install nearfar[hf]``, ``nearfar[diffusers]``) and is imported only when asked for."""
