@echo off
REM Windows twin of launch/start_service.sh: demo | single (torchrun with NCCL is not available on Windows).
setlocal
cd /d "%~dp0\.."
set MODE=%1
if "%MODE%"=="" set MODE=demo
if not exist .venv\Scripts\python.exe (
    py -3.11 -m venv .venv || python -m venv .venv
    .venv\Scripts\python.exe -m pip install torch==2.13.0
    .venv\Scripts\python.exe -m pip install -c constraints.txt -r requirements.txt
)
set HF_HUB_OFFLINE=1
set TRANSFORMERS_OFFLINE=1
set GRADIO_ANALYTICS_ENABLED=False
set PYTHONUNBUFFERED=1
if "%MODE%"=="demo" (
    .venv\Scripts\python.exe distributed_app.py --preset tiny %2 %3 %4 %5 %6 %7 %8 %9
) else if "%MODE%"=="single" (
    .venv\Scripts\python.exe distributed_app.py --preset multitalk-14b %2 %3 %4 %5 %6 %7 %8 %9
) else (
    echo usage: launch\start_service.bat demo^|single [flags]
    echo distributed mode needs Linux: torchrun with NCCL
    exit /b 2
)
