"""The Gradio page: state, handlers, API endpoints, figures."""
