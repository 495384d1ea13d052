"""`jaxtag serve`'s web app: `create_app(service)` (jaxtag/server/app.py) and its page (static/).

Needs the `serve` extra: `pip install 'jaxtag[serve]'` (FastAPI, uvicorn, python-multipart).
"""
