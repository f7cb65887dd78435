"""The Gradio page and its API.

``layout`` (the widgets, a dataclass per section), ``handlers`` and ``controls`` (the events, each
taking the widgets it reads by name), ``wiring`` (events, queues, public endpoints), ``text``,
``errors``, ``page`` and ``view`` (outputs and what applies), ``figures`` (plotly), ``state`` and
``api`` (sessions, the model cache, the stateless endpoints); ``build.build_demo`` puts them
together for the root ``app.py``.
"""
