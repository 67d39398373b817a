from bmmstream.cli import app

app(prog_name="bmm")
