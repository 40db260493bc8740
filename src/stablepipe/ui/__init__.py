"""The web app (`stablepipe ui`): a Gradio app with a tab per task, sharing one set of loaded weights.

Modules: `session` (the ModelManager: checkpoints loaded once, pipelines built from shared components),
`tasks` (what each tab runs), `run` (seeds, PNGs with settings), `controls` (shared widgets and wiring),
`tabs` (one function per tab), `app` (the Blocks and the server). Only `controls`, `tabs` and `app` import
gradio, an optional extra: `pip install "stablepipe[ui]"`.
"""
