from meshllm.cli import main

main()
