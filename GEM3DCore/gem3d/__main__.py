from gem3d.cli import main

main(prog_name="gem3d")
