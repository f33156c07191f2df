"""Role aliases for the Llama, GPT-2 and BERT families.

A role word used as a plain segment of a pattern (``attn.*``) also matches each fragment listed
here, so one ``.surgery`` file works unchanged across architectures:

=========  ===========================  =============  ======================================
role       Llama / Mistral / Qwen       GPT-2          BERT
=========  ===========================  =============  ======================================
attn       self_attn                    attn           attention (self + output.dense)
mlp        mlp                          mlp            intermediate, layer.N.output
layers     layers                       h              layer
embed      embed_tokens                 wte            word_embeddings
=========  ===========================  =============  ======================================
"""

from adapterhub.registry import hookimpl


@hookimpl
def register_aliases(register):
    register("attn", ["self_attn"], family="llama")
    register("mlp", ["mlp"], family="llama")
    register("layers", ["layers"], family="llama")
    register("embed", ["embed_tokens"], family="llama")

    register("attn", ["attn"], family="gpt2")
    register("mlp", ["mlp"], family="gpt2")
    register("layers", ["h"], family="gpt2")
    register("embed", ["wte"], family="gpt2")

    register("attn", ["attention"], family="bert")
    register("mlp", ["intermediate", "layer.*.output"], family="bert")
    register("layers", ["layer"], family="bert")
    register("embed", ["word_embeddings"], family="bert")
