from batchjobs.cli import main

main(prog_name="batchjobs")
