"""Reinforcement learning with namm: a Decision Transformer on CartPole-v1 whose KV cache is managed
by namm's memory policies (the language-evolved NAMM zero-shot, and the baselines).

``data`` generates behaviour episodes (needs gymnasium: ``pip install 'namm[rl]'``), ``model`` is
the Decision Transformer (a transformers Llama decoder fed ``inputs_embeds``), ``train`` trains it,
``rollout`` runs it through the memory runtime, ``retention`` shows which timesteps a policy keeps
and ``benchmark`` builds the results table (``namm rl train`` / ``namm rl eval``).
"""
